"""The backend registry: one `Backend` per weight format, tried in dispatch order.

A backend is the one home of everything about its format: how to recognise a module, read its
shape and compute dtype, dequantize it, run its base forward, requantize a dense weight into it,
quantize a dense linear and load a causal LM in it, the optional package it needs, and the
names users give it (`nf4`/`fp4` for bitsandbytes 4-bit, ...). Every list of formats (the
command's `--quant` choices, `quantize_model`, the benchmarks, the tests' parametrisation) is
read from here (`quant_names`, `format_for`), so a new format is one file plus one
`register_backend` call. Everything about adapters lives in `lora.py`.

The first backend whose `matches` is true handles a module; the dense backend is registered last,
so quantized subclasses of `nn.Linear` (bitsandbytes' layers) are caught first. The built-ins are
registered by `qlora_inject.backends`, which the package imports; this module imports none of them
(no import cycle).
"""

from __future__ import annotations

import functools
import inspect
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@runtime_checkable
class Backend(Protocol):
    """What a weight format must provide to be wrapped with LoRA (the seven required members).

    `BackendBase` implements this protocol with documented defaults for everything but `name`,
    `matches` and `dequantize`, plus the optional hooks below; subclass it, or implement the protocol
    yourself (the optional hooks are then read with their defaults: `trains_fused`,
    `base_forward_is_exact`, `declared_forward_rtol`).
    """

    name: str

    def matches(self, module: nn.Module) -> bool:
        """True when this backend handles `module` (by class, or by its attributes)."""
        ...

    def features(self, module: nn.Module) -> tuple[int, int]:
        """`(in_features, out_features)` of the layer."""
        ...

    def compute_dtype(self, module: nn.Module) -> torch.dtype | None:
        """The dtype the layer computes in; None means 'whatever the input is'."""
        ...

    def dequantize(self, module: nn.Module, out: Tensor | None = None) -> Tensor:
        """The dense (out, in) weight, in pure torch; written into `out` (a scratch of out·in elements in the
        compute dtype) where the backend can, which lets training run through the fused op."""
        ...

    def forward(self, module: nn.Module, x: Tensor) -> Tensor:
        """The base layer's output for `x` (bias included)."""
        ...

    def requantize(self, module: nn.Module, weight: Tensor) -> nn.Module:
        """A new module of the same format holding the dense (out, in) `weight`."""
        ...


class BackendBase:
    """A backend's defaults. Asking a backend a question never changes the module it is asked about.

    Required in a subclass: `name`, `matches`, `dequantize` (taking `out=`), and `requantize` for merges.
    Optional, with these defaults:
    - `fused`: None, meaning "decide from `dequantize`'s signature": a backend whose `dequantize` takes
      `out=` trains through the fused op (kernels/fused_lora.py: x·dequantize(W)ᵀ + bias, or `forward`
      itself where `forward_is_exact` is False, and a backward that re-dequantizes). Set False to keep
      the unfused path (the module's own forward, then the adapters).
    - `forward_is_exact(module, device)`: True; False when `forward(x)` is not x·dequantize(W)ᵀ + bias up
      to float rounding for the module as it is now (LLM.int8 rounds activations); DoRA then reads W.
    - `module_forward_rtol(module, dtype)`: None; where the base output is computed here rather than by
      the module's own forward in another precision, the relative (norm) difference to expect.
    - `reference_forward(module, x)`: absent; the owning library's own computation, for the layout
      self-check, when `forward` is not the module's.
    - `check(module)`: raise when the module cannot be wrapped as it is (called while planning).
    - `adopt(module)`: called once when a `LoraLinear` takes the module as its base.

    Format facts for users (what `--quant`, `quantize_model`, `load_quantized` and the benchmarks read):
    - `quant_names`: the names users give this format, the first its default (`("nf4", "fp4")`), and
      `quant_name(module)`: which of them a module is.
    - `package`: the import name of the library the format needs (None: torch only), and
      `install`: how to get it (named in errors).
    - `quantize(linear, quant, ...)`: a new layer of this format holding a dense `nn.Linear`'s weight, and
      `quantizer_summary(quant, group_size)`: how, in a few words.
    - `load_causal_lm(path, quant, ...)`: a transformers causal LM from a local directory in this format;
      the default loads it dense and quantizes every linear but the head with `quantize`.
    - `saved_by_transformers`: whether transformers can save a model holding these layers as they are.
    """

    name: str = ""
    fused: bool | None = None
    quant_names: tuple[str, ...] = ()
    package: str | None = None
    install: str = ""
    saved_by_transformers: bool = False

    def matches(self, module: nn.Module) -> bool:
        raise NotImplementedError(f"{type(self).__name__} must implement matches(module)")

    def features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def compute_dtype(self, module: nn.Module) -> torch.dtype | None:
        return None                                                   # computes in the input's dtype

    def dequantize(self, module: nn.Module, out: Tensor | None = None) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement dequantize(module, out=None)")

    def forward(self, module: nn.Module, x: Tensor) -> Tensor:
        return module(x)

    def requantize(self, module: nn.Module, weight: Tensor) -> nn.Module:
        raise NotImplementedError(f"the {self.name!r} backend cannot requantize, so its layers cannot be merged; "
                                  "merge into a dense model instead (merge_and_unload(dequantize=True))")

    def forward_is_exact(self, module: nn.Module, device: torch.device) -> bool:
        return True

    def module_forward_rtol(self, module: nn.Module, dtype: torch.dtype) -> float | None:
        return None

    def check(self, module: nn.Module) -> None:
        return None

    def adopt(self, module: nn.Module) -> None:
        """Called once when a `LoraLinear` takes `module` as its base (bitsandbytes 4-bit opts the layer out
        of its in-place CPU repacking here); the default does nothing."""
        return None

    def quant_name(self, module: nn.Module) -> str:
        """The name users give `module`'s format (what `--quant` takes): the first of `quant_names`."""
        return self.quant_names[0] if self.quant_names else self.name

    def quantizer_summary(self, quant: str, group_size: int) -> str:
        """How `quantize` makes format `quant`, in a few words (benchmark tables)."""
        return f"{quant}: the {self.name!r} backend's quantizer"

    def quantize(self, linear: nn.Linear, quant: str, *, compute_dtype: torch.dtype = torch.float32,
                 group_size: int = 64, bits: int = 4, device: str | torch.device = "cpu") -> nn.Module:
        """A new layer of this format (variant `quant`, one of `quant_names`) holding `linear`'s weight and bias.

        Args:
            linear: The dense layer; left as it is.
            quant: Which of this format's names (e.g. `nf4` or `fp4`).
            compute_dtype: The dtype the new layer computes in, where the format has one.
            group_size: Columns per quantization group, where the format has groups.
            bits: Bits per weight, where the format offers a choice.
            device: Where the new layer lives.
        """
        raise NotImplementedError(f"the {self.name!r} backend cannot quantize a dense layer; quantize with its "
                                  "own library and inject LoRA into the result")

    def load_causal_lm(self, path, quant: str, *, compute_dtype: torch.dtype = torch.float32,
                       dtype: torch.dtype | None = None, shardable: bool = False, group_size: int | None = None):
        """A transformers causal LM read from the local directory `path`, in this format (variant `quant`).

        The default loads it dense and replaces every `nn.Linear` but the head with `quantize`'s layer.

        Args:
            path: A Hugging Face model directory.
            compute_dtype: The quantized layers' compute dtype.
            dtype: The activations' (non-quantized weights') dtype; None keeps the checkpoint's.
            shardable: Store packed weights in a dtype FSDP can shard, where the format can.
            group_size: Quantization group size; None picks the largest of 128, 64, 32 that fits the model.
        """
        from transformers import AutoModelForCausalLM

        from qlora_inject.quantize import default_group_size, quantize_model

        model = AutoModelForCausalLM.from_pretrained(path, **({} if dtype is None else {"dtype": dtype}))
        size = group_size or default_group_size(model.config)
        return quantize_model(model, quant, group_size=size, compute_dtype=compute_dtype)

    def check_weight_shape(self, module: nn.Module, weight: Tensor) -> None:
        """Refuse a dense `weight` that does not fit `module` (for `requantize`)."""
        in_features, out_features = self.features(module)
        if tuple(weight.shape) != (out_features, in_features):
            raise ValueError(
                f"weight of shape {tuple(weight.shape)} does not fit a {in_features}->{out_features} layer, "
                f"which needs ({out_features}, {in_features}) ({self.name} backend)"
            )


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
    taken = sorted(set(getattr(backend, "quant_names", ())) & set(quant_names()))
    if taken:
        raise ValueError(f"format names {taken} of backend {backend.name!r} are already registered "
                         f"(registered: {quant_names()}); pick other quant_names")
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
    return [b.name for b in _BACKENDS]


def get_backend(name: str) -> Backend:
    """The registered backend called `name`."""
    for backend in _BACKENDS:
        if backend.name == name:
            return backend
    raise ValueError(f"no backend named {name!r}; registered: {backend_names()}")


def quant_names() -> list[str]:
    """Every name users can give a format (`--quant`, `quantize_model`, `load_quantized`), in dispatch order,
    with `none` (the dense backend) last."""
    return [quant for backend in _BACKENDS for quant in getattr(backend, "quant_names", ())]


def quantized_names() -> list[str]:
    """`quant_names()` without the dense backend's `none`: the formats a dense layer can be quantized to."""
    return [quant for backend in _BACKENDS if backend.name != "dense" for quant in getattr(backend, "quant_names", ())]


def format_for(quant: str) -> Backend:
    """The backend of the format users call `quant` (e.g. `nf4` -> bnb-4bit); a backend's own name works too.

    Raises:
        ValueError: naming `quant` and every name there is.
    """
    for backend in _BACKENDS:
        if quant in getattr(backend, "quant_names", ()) or quant == backend.name:
            return backend
    raise ValueError(f"unknown format {quant!r}; choose one of {', '.join(quant_names())} "
                     "(or register a backend for it: qlora_inject.register_backend)")


def default_quant(quant: str) -> str:
    """`quant` as a user name: a backend's own name (`bnb-4bit`) becomes its default user name (`nf4`)."""
    backend = format_for(quant)
    names = getattr(backend, "quant_names", ())
    return quant if quant in names or not names else names[0]


def format_available(quant: str) -> bool:
    """Whether the library format `quant` needs is installed."""
    import importlib.util

    package = getattr(format_for(quant), "package", None)
    return package is None or importlib.util.find_spec(package) is not None


def find_backend(module: nn.Module) -> Backend | None:
    """The first registered backend that handles `module`, or None."""
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


def trains_fused(backend: Backend) -> bool:
    """Whether layers of `backend` train through the fused op: its `fused` flag where it sets one, else
    whether its `dequantize` takes an `out=` scratch."""
    declared = getattr(backend, "fused", None)
    return bool(declared) if declared is not None else _dequantize_takes_out(type(backend))


@functools.cache
def _dequantize_takes_out(backend_type: type) -> bool:
    try:
        return "out" in inspect.signature(backend_type.dequantize).parameters
    except (TypeError, ValueError, AttributeError):
        return False


def base_forward_is_exact(backend: Backend, module: nn.Module, device: torch.device) -> bool:
    """Whether `backend.forward(module, x)` for an `x` on `device` is x·dequantize(W)ᵀ + bias up to float
    rounding (the backend's `forward_is_exact`, True where it has none)."""
    check = getattr(backend, "forward_is_exact", None)
    return True if check is None else bool(check(module, device))


def declared_forward_rtol(backend: Backend, module: nn.Module, dtype: torch.dtype) -> float | None:
    """How far (relative, in norm) the wrapped base output may be from `module`'s own forward for inputs of
    `dtype`, as the backend declares it (`module_forward_rtol`); None where it declares nothing."""
    declared = getattr(backend, "module_forward_rtol", None)
    value = None if declared is None else declared(module, dtype)
    return None if value is None else float(value)


def check_wrappable(backend: Backend, module: nn.Module) -> None:
    """Run the backend's `check(module)` where it has one (raises when the module cannot be wrapped)."""
    check = getattr(backend, "check", None)
    if check is not None:
        check(module)


def class_is(module: nn.Module, class_name: str, module_prefix: str) -> bool:
    """True when `module`'s class, or a base class, is `class_name` defined under `module_prefix`.

    Checks names along the MRO, so the owning library need not be imported to recognise it.
    """
    return any(
        c.__name__ == class_name and c.__module__.startswith(module_prefix) for c in type(module).__mro__
    )
