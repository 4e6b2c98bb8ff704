"""The per-sample adapter assignment of a mixed-batch call, carried by the call itself.

`LoraModel(..., adapter_names=[...])` runs the model with sample i using adapter `adapter_names[i]`.
The assignment lives in a `contextvars.ContextVar` for the duration of the call, keyed by the wrapped
modules of that model, never as state on the modules: calls from several threads (or asyncio tasks) at
once, each with its own names, each see their own, and a model called inside another model's mixed
batch sees only its own assignment.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from torch import nn

# id(wrapper module) -> one adapter name per sample, for the calls running in this context.
_ASSIGNMENT: ContextVar[dict[int, tuple[str, ...]] | None] = ContextVar("qlora_inject_batch_adapters", default=None)


@contextmanager
def assign_adapters(modules: Iterable[nn.Module], adapter_names: list[str]) -> Iterator[None]:
    """Inside it, in this thread or task only, `modules` run sample i with adapter `adapter_names[i]`."""
    names = tuple(adapter_names)
    token = _ASSIGNMENT.set({**(_ASSIGNMENT.get() or {}), **{id(module): names for module in modules}})
    try:
        yield
    finally:
        _ASSIGNMENT.reset(token)


def assigned_adapters(module: nn.Module) -> list[str] | None:
    """The per-sample adapter names assigned to `module` by the current call, or None outside a mixed batch."""
    assignment = _ASSIGNMENT.get()
    names = None if assignment is None else assignment.get(id(module))
    return None if names is None else list(names)
