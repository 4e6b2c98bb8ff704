"""The backend registry: one `Backend` per weight format, tried in dispatch order.

A backend holds format facts only (how to recognise a module, read its shape, dequantize it,
run its base forward, requantize a dense weight into it). Everything about adapters lives in
`lora.py`. The first backend whose `matches` is true handles a module; the dense backend is
registered last, so quantized subclasses of `nn.Linear` (bitsandbytes' layers) are caught first.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@runtime_checkable
class Backend(Protocol):
    """What a weight format must provide to be wrapped with LoRA."""

    name: str
    # Optional attributes a backend may set:
    #   forward_is_exact(module, device) -> bool  False when forward(x) is not x·dequantize(W)ᵀ + bias
    #                          up to float rounding for the module as it is now (LLM.int8 rounds
    #                          activations, except in bitsandbytes' CPU training path); DoRA then reads
    #                          W instead of the forward. Absent: always exact.
    #   reference_forward(module, x)  the owning library's own computation, for the layout self-check,
    #                          when `forward` is ours rather than the module's.
    #   module_forward_rtol(module, dtype) -> float  where the base output (adapters disabled included) is
    #                          computed here rather than by the module's own forward, and the module's own
    #                          forward computes in another precision: the relative (norm) difference to
    #                          expect between the two for inputs of `dtype`. Absent: not declared.
    #   fused = True           `dequantize` takes an `out=` scratch (it may ignore it): training then runs
    #                          the base and its plain LoRA adapters as one op (kernels/fused_lora.py),
    #                          whose forward is x·dequantize(W)ᵀ + module.bias, or `forward` itself
    #                          when the forward is not exact, and whose backward re-dequantizes.

    def matches(self, module: nn.Module) -> bool:
        """True when this backend handles `module` (by class, or by its attributes)."""
        ...

    def features(self, module: nn.Module) -> tuple[int, int]:
        """`(in_features, out_features)` of the layer."""
        ...

    def compute_dtype(self, module: nn.Module) -> torch.dtype | None:
        """The dtype the layer computes in; None means 'whatever the input is'."""
        ...

    def dequantize(self, module: nn.Module) -> Tensor:
        """The dense (out, in) weight, in pure torch."""
        ...

    def forward(self, module: nn.Module, x: Tensor) -> Tensor:
        """The base layer's output for `x` (bias included)."""
        ...

    def requantize(self, module: nn.Module, weight: Tensor) -> nn.Module:
        """A new module of the same format holding the dense (out, in) `weight`."""
        ...


class UnsupportedModuleError(TypeError):
    """A targeted module that no registered backend handles."""


_BACKENDS: list[Backend] = []


def register_backend(backend: Backend, *, before: str | None = None) -> Backend:
    """Add a backend to the dispatch order.

    Args:
        backend: An object with the `Backend` methods and a unique `name`.
        before: Name of a registered backend to insert in front of; by default the new backend
            goes in front of the dense fallback, so it is tried before plain `nn.Linear`.

    Returns:
        The backend, so this can be used as a decorator on an instance factory.
    """
    _ensure_builtins()
    missing = [m for m in ("matches", "features", "compute_dtype", "dequantize", "forward", "requantize")
               if not callable(getattr(backend, m, None))]
    if missing or not isinstance(getattr(backend, "name", None), str):
        raise TypeError(
            f"{backend!r} is not a Backend: it lacks {missing or ['name']}; "
            "see qlora_inject.registry.Backend for the methods to implement"
        )
    names = [b.name for b in _BACKENDS]
    if backend.name in names:
        raise ValueError(f"a backend named {backend.name!r} is already registered; pick another name")
    if before is None:
        before = "dense" if "dense" in names else None
    if before is not None and before not in names:
        raise ValueError(f"before={before!r} is not a registered backend; registered: {names}")
    _BACKENDS.insert(names.index(before) if before is not None else len(_BACKENDS), backend)
    return backend


def unregister_backend(name: str) -> Backend:
    """Remove and return the backend called `name`."""
    for i, backend in enumerate(_BACKENDS):
        if backend.name == name:
            return _BACKENDS.pop(i)
    raise ValueError(f"no backend named {name!r}; registered: {backend_names()}")


def backend_names() -> list[str]:
    """Names of the registered backends, in dispatch order."""
    _ensure_builtins()
    return [b.name for b in _BACKENDS]


def get_backend(name: str) -> Backend:
    """The registered backend called `name`."""
    _ensure_builtins()
    for backend in _BACKENDS:
        if backend.name == name:
            return backend
    raise ValueError(f"no backend named {name!r}; registered: {backend_names()}")


def find_backend(module: nn.Module) -> Backend | None:
    """The first registered backend that handles `module`, or None."""
    _ensure_builtins()
    for backend in _BACKENDS:
        if backend.matches(module):
            return backend
    return None


def require_backend(module: nn.Module, name: str) -> Backend:
    """Like `find_backend`, but raise a helpful `UnsupportedModuleError` when none matches."""
    backend = find_backend(module)
    if backend is None:
        cls = type(module)
        raise UnsupportedModuleError(
            f"module {name!r} is a {cls.__module__}.{cls.__qualname__}, which no backend handles "
            f"(registered: {backend_names()}). Remove it from target_modules, or register a backend: "
            "`qlora_inject.register_backend(MyBackend())` with name, matches, features, compute_dtype, "
            "dequantize, forward and requantize (see qlora_inject.registry.Backend)"
        )
    return backend


def forward_is_exact(backend: Backend, module: nn.Module, device: torch.device) -> bool:
    """Whether `backend.forward(module, x)` for an `x` on `device` is x·dequantize(W)ᵀ + bias up to float
    rounding (the backend's `forward_is_exact`, True where it has none)."""
    check = getattr(backend, "forward_is_exact", None)
    return True if check is None else bool(check(module, device))


def module_forward_rtol(backend: Backend, module: nn.Module, dtype: torch.dtype) -> float | None:
    """How far (relative, in norm) the wrapped base output may be from `module`'s own forward for inputs of
    `dtype`, as the backend declares it (`module_forward_rtol`); None where it declares nothing."""
    declared = getattr(backend, "module_forward_rtol", None)
    return None if declared is None else float(declared(module, dtype))


def class_is(module: nn.Module, class_name: str, module_prefix: str) -> bool:
    """True when `module`'s class, or a base class, is `class_name` defined under `module_prefix`.

    Checks names along the MRO, so the owning library need not be imported to recognise it.
    """
    return any(
        c.__name__ == class_name and c.__module__.startswith(module_prefix) for c in type(module).__mro__
    )


_builtins_loaded = False


def _ensure_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        from qlora_inject import backends  # noqa: F401  (registers the built-in backends)
