"""DoRA (weight-decomposed LoRA) on any base format.

    W' = m ⊙ (W + s·B A) / ‖W + s·B A‖_row          (m: a trained magnitude per output row)
    y  = base(x) + (m/‖·‖ − 1) ⊙ (base(x) − bias) + (m/‖·‖) ⊙ s·B A x

The row norm is treated as a constant (detached), as the DoRA paper and PEFT do. It is computed
without dequantizing the base each step: the base is frozen, so ‖W‖² per row is computed once,
and the rest needs only W Aᵀ, which is the base's own forward on the r rows of A (for a backend
whose forward rounds its input, LLM.int8, W Aᵀ comes from the dequantized weight instead):

    ‖W + s·B A‖²_row = ‖W‖²_row + 2s·Σ_k B ⊙ (W Aᵀ) + s²·Σ_k B ⊙ (B A Aᵀ)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qlora_inject.registry import base_forward_is_exact


class MagnitudeVector(nn.Module):
    """DoRA's magnitude `m`, one per output row; `.weight` so state-dict keys match PEFT's."""

    def __init__(self, magnitude: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude)


def initial_magnitude(dense_weight: Tensor, delta: Tensor) -> Tensor:
    """‖W + ΔW‖ per row, fp32: DoRA starts where the adapted layer is."""
    return torch.linalg.vector_norm(dense_weight.float() + delta.float(), dim=1)


def base_row_norm_sq(layer) -> Tensor:
    """‖W‖² per row of the layer's (unmerged) base, computed once per base module."""
    base = layer.base_layer
    cached = layer.__dict__.get("dora_base_norm_sq")
    if cached is None or cached[0] is not base:
        with torch.no_grad():
            norm_sq = layer.backend.dequantize(base).float().square().sum(dim=1)
        layer.__dict__["dora_base_norm_sq"] = cached = (base, norm_sq)
    return cached[1]


def base_without_bias(layer, x: Tensor) -> Tensor:
    """The base's output for `x` (`LoraLinear.base_output`: the fused op's dequantization where it
    applies, else the module's own forward), minus its bias: x Wᵀ."""
    out = layer.base_output(x)
    bias = getattr(layer.base_layer, "bias", None)
    return out if bias is None else out - bias.to(out.dtype)


def row_norm(layer, name: str) -> Tensor:
    """‖W + s·B A‖ per row for adapter `name`, fp32, without materialising W."""
    with torch.no_grad():
        A = layer.lora_A[name].weight.float()                                 # (r, in)
        B = layer.lora_B[name].weight.float()                                 # (out, r)
        s = layer.scaling[name]
        dtype = layer.lora_compute_dtype[name] or torch.float32
        if base_forward_is_exact(layer.backend, layer.base_layer, A.device):
            w_at = base_without_bias(layer, A.to(dtype)).float().t()          # (out, r) = W Aᵀ, by the base itself
        else:                                                                 # its forward rounds: use the weight
            w_at = layer.backend.dequantize(layer.base_layer).float() @ A.t()
        cross = (B * w_at).sum(dim=1)
        quadratic = (B @ (A @ A.t()) * B).sum(dim=1)
        norm_sq = base_row_norm_sq(layer) + 2 * s * cross + s * s * quadratic
        return norm_sq.clamp_min(0).sqrt()


def add_dora(layer, result: Tensor, x: Tensor, name: str, dtype: torch.dtype) -> Tensor:
    """`result` (the base output) plus DoRA's term for adapter `name`."""
    dropout = layer.lora_dropout[name]
    dropped = dropout(x.to(dtype))
    lora = torch.nn.functional.linear(
        torch.nn.functional.linear(dropped, layer.lora_A[name].weight.to(dtype)), layer.lora_B[name].weight.to(dtype)
    )                                                                          # (…, out)
    scale = (layer.lora_magnitude_vector[name].weight.float() / row_norm(layer, name)).to(dtype)   # (out,)
    if isinstance(dropout, nn.Identity):
        bias = getattr(layer.base_layer, "bias", None)
        base = result if bias is None else result - bias.to(result.dtype)
    else:
        base = base_without_bias(layer, dropped)                               # the magnitude sees dropped input too
    return result + ((scale - 1) * base.to(dtype) + scale * layer.scaling[name] * lora).to(result.dtype)


def merged_weight(dense_weight: Tensor, delta: Tensor, magnitude: Tensor) -> Tensor:
    """m ⊙ (W + ΔW) / ‖W + ΔW‖_row, fp32."""
    combined = dense_weight.float() + delta.float()
    return (magnitude.float() / torch.linalg.vector_norm(combined, dim=1))[:, None] * combined
