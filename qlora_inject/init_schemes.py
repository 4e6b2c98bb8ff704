"""Data-aware adapter initialisation on quantized bases: PiSSA, OLoRA and LoftQ.

Each returns `(A, B, new_base)`: the adapter starts on the weight's principal part, and the base is
replaced by the residual, requantized in the base's own format (for a dense base: kept dense), so
that `base + s·B A` starts close to the original layer.

- PiSSA: the top-r singular triplets, W ≈ U_r S_r V_rᵀ; B = U_r √(S_r/s), A = √(S_r/s) V_rᵀ.
  `"pissa_niter_N"` uses a randomized SVD with N subspace iterations (faster on big layers).
- OLoRA: W = Q R; B = Q[:, :r], A = R[:r] (PEFT's convention: the residual is W − s·B A).
- LoftQ: needs the full-precision weight, so it runs on a dense base and produces a quantized one in
  `loftq_config["format"]`: alternately quantize W − s·B A with that format's own quantizer and fit
  B A to the quantization residual by SVD, `loftq_config["loftq_iter"]` times.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

SCHEMES = ("pissa", "olora", "loftq")


def is_scheme(value: object) -> bool:
    return isinstance(value, str) and (value in SCHEMES or re.fullmatch(r"pissa_niter_\d+", value) is not None)


def _top_r(weight: Tensor, r: int, niter: int | None) -> tuple[Tensor, Tensor, Tensor]:
    if niter is None:
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        return U[:, :r], S[:r], Vh[:r]
    U, S, V = torch.svd_lowrank(weight, q=r, niter=niter)
    return U, S, V.t()


def principal_factors(weight: Tensor, r: int, scaling: float, niter: int | None = None) -> tuple[Tensor, Tensor]:
    """(A, B) with s·B A the best rank-r approximation of `weight` (fp32)."""
    U, S, Vh = _top_r(weight.float(), r, niter)
    root = (S / scaling).sqrt()
    return root[:, None] * Vh, U * root[None, :]                              # (r, in), (out, r)


def initialise(scheme: str, layer, r: int, scaling: float, loftq_config: dict) -> tuple[Tensor, Tensor, nn.Module]:
    """Compute `(A, B, new_base)` for `layer` (a LoraLinear); nothing is modified."""
    backend, base = layer.backend, layer.base_layer
    with torch.no_grad():
        weight = backend.dequantize(base).to(torch.float32, copy=True)      # (out, in)
        if scheme.startswith("pissa"):
            niter = int(scheme.rsplit("_", 1)[1]) if scheme != "pissa" else None
            A, B = principal_factors(weight, r, scaling, niter)
        elif scheme == "olora":
            Q, R = torch.linalg.qr(weight)
            A, B = R[:r].contiguous(), Q[:, :r].contiguous()
        elif scheme == "loftq":
            return _loftq(layer, weight, r, scaling, loftq_config)
        else:
            raise ValueError(f"unknown initialisation {scheme!r}; choose one of {SCHEMES}")
        return A, B, backend.requantize(base, weight - scaling * (B @ A))


def _loftq(layer, weight: Tensor, r: int, scaling: float, loftq_config: dict):
    from qlora_inject.quantize import linear_from, quantize_linear
    from qlora_inject.registry import find_backend, quantized_names

    fmt = loftq_config.get("format")
    formats = tuple(quantized_names())
    if layer.backend.name != "dense" or fmt not in formats:
        raise ValueError(
            f"LoftQ needs the full-precision weight: inject it into the dense model with "
            f"loftq_config={{'format': one of {formats}, 'loftq_iter': 1}} (got backend {layer.backend.name!r}, "
            f"format {fmt!r}); the base is then quantized to that format by its own library"
        )
    options = {"group_size": 64, **{k: v for k, v in loftq_config.items() if k in ("bits", "group_size")}}
    bias = getattr(layer.base_layer, "bias", None)
    A = torch.zeros(r, weight.shape[1], device=weight.device)
    B = torch.zeros(weight.shape[0], r, device=weight.device)
    for _ in range(max(1, int(loftq_config.get("loftq_iter", 1)))):
        target = linear_from(weight - scaling * (B @ A), bias)
        quantized = quantize_linear(target, fmt, device=weight.device, **options)
        residual = weight - find_backend(quantized).dequantize(quantized).float().to(weight.device)
        A, B = principal_factors(residual, r, scaling)
    return A, B, quantized
