"""A cheap check that a backend reads a layer's layout right, before any training happens.

For one layer of each configuration, `base(x)` (the module's own forward) is compared with
`x · dequantize(base)ᵀ + bias` on a small random probe. A misread layout (wrong packing order,
zero-point convention, transposition) gives a relative error near 1 or more; correct reads stay
at quantization noise (LLM.int8's activation rounding, bf16 arithmetic: a few percent at most).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qlora_inject.registry import Backend

TOLERANCE = 0.1


class LayoutMismatchError(ValueError):
    """A layer whose dequantized weight disagrees with its own forward."""


def layer_key(backend: Backend, module: nn.Module) -> tuple:
    """What makes two layers the same configuration for the check."""
    return (backend.name, type(module), backend.features(module), backend.compute_dtype(module))


def verify_layout(backend: Backend, module: nn.Module, name: str, tolerance: float = TOLERANCE) -> float | None:
    """Return the relative error of the dequantized path against the module's forward.

    Returns None (no check) for a layer on the meta device.

    Raises:
        LayoutMismatchError: When the error exceeds `tolerance`.
    """
    device = next((t.device for t in (*module.parameters(), *module.buffers())), torch.device("cpu"))
    if device.type == "meta":
        return None
    in_features, _ = backend.features(module)
    dtype = backend.compute_dtype(module) or torch.float32
    probe = torch.randn(2, in_features, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    with torch.no_grad():
        reference = getattr(backend, "reference_forward", backend.forward)   # the library's own computation
        actual = reference(module, probe).float()
        weight = backend.dequantize(module).to(device, torch.float32)
        bias = getattr(module, "bias", None)
        expected = F.linear(probe.float(), weight, None if bias is None else bias.float())
    error = ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()
    if not error <= tolerance:                                              # also catches NaN
        raise LayoutMismatchError(
            f"layer {name!r} ({type(module).__name__}, backend {backend.name!r}): its own forward and "
            f"x·dequantize(W)ᵀ disagree by {error:.3g} (relative; at most {tolerance} expected). Its packed "
            "layout is not the one this backend reads (or the owning library computes this layer wrongly: "
            "bitsandbytes 0.50 on the CPU does for 4-bit layers whose in_features is not a multiple of the "
            "blocksize), so LoRA would train on a wrong weight. If the layer comes from a library version this "
            "backend does not know, register a backend for it (qlora_inject.register_backend)"
        )
    return error
