"""DoRA (weight-decomposed LoRA) on any base format: the `DoraVariant` of an adapter.

    W' = m ⊙ (W + s·B A) / ‖W + s·B A‖_row          (m: a trained magnitude per output row)
    y  = base(x) + (m/‖·‖ − 1) ⊙ (base(x) − bias) + (m/‖·‖) ⊙ s·B A x

The row norm is treated as a constant (detached), as the DoRA paper and PEFT do. It is computed
without dequantizing the base each step: the base is frozen, so ‖W‖² per row is computed once,
and the rest needs only W Aᵀ, which is the base's own forward on the r rows of A (for a backend
whose forward rounds its input, LLM.int8, W Aᵀ comes from the dequantized weight instead):

    ‖W + s·B A‖²_row = ‖W‖²_row + 2s·Σ_k B ⊙ (W Aᵀ) + s²·Σ_k B ⊙ (B A Aᵀ)

The magnitude lives in the layer's `lora_magnitude_vector[name]` (`.weight`, PEFT's state-dict key)
and is saved as PEFT saves it, `<module>.lora_magnitude_vector` without `.weight`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from qlora_inject.registry import base_forward_is_exact
from qlora_inject.variant import LoraVariant

if TYPE_CHECKING:
    from qlora_inject.lora import AdapterSpec, LoraLinear

MAGNITUDE = "lora_magnitude_vector"                                          # the layer's table of magnitudes


class MagnitudeVector(nn.Module):
    """DoRA's magnitude `m`, one per output row; `.weight` so state-dict keys match PEFT's."""

    def __init__(self, magnitude: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude)


def initial_magnitude(dense_weight: Tensor, delta: Tensor) -> Tensor:
    """‖W + ΔW‖ per row, fp32: DoRA starts where the adapted layer is."""
    return torch.linalg.vector_norm(dense_weight.float() + delta.float(), dim=1)


class DoraVariant(LoraVariant):
    """DoRA: a magnitude per output row rescales W + s·B A to its norm. Not fusable (its term needs the
    row norm), not combinable (magnitudes do not add)."""

    name = "dora"
    fusable = False
    combinable = False

    def __init__(self) -> None:
        self._base_norm_sq: tuple[nn.Module, Tensor] | None = None          # (base module, ‖W‖² per row)

    def init(self, layer: LoraLinear, spec: AdapterSpec, lora_A: nn.Linear, lora_B: nn.Linear,
             base: nn.Module) -> dict[str, nn.Module]:
        """The magnitude, ‖W + s·B A‖ per row of `base` (left uninitialised on the meta device)."""
        weight = lora_A.weight
        magnitude = torch.empty(layer.out_features, device=weight.device, dtype=weight.dtype)
        if weight.device.type != "meta":
            with torch.no_grad():
                delta = spec.scaling * (lora_B.weight.float() @ weight.float())
                magnitude = initial_magnitude(layer.backend.dequantize(base), delta).to(weight.dtype)
        return {MAGNITUDE: MagnitudeVector(magnitude)}

    def base_row_norm_sq(self, layer: LoraLinear) -> Tensor:
        """‖W‖² per row of the layer's (unmerged) base, computed once per base module."""
        base = layer.base_layer
        if self._base_norm_sq is None or self._base_norm_sq[0] is not base:
            with torch.no_grad():
                norm_sq = layer.backend.dequantize(base).float().square().sum(dim=1)
            self._base_norm_sq = (base, norm_sq)
        return self._base_norm_sq[1]

    def row_norm(self, layer: LoraLinear, name: str) -> Tensor:
        """‖W + s·B A‖ per row for adapter `name`, fp32, without materialising W."""
        with torch.no_grad():
            A, B, s = layer.factors(name)
            A, B = A.float(), B.float()                                           # (r, in), (out, r)
            dtype = layer.lora_compute_dtype[name] or torch.float32
            if base_forward_is_exact(layer.backend, layer.base_layer, A.device):
                w_at = _base_without_bias(layer, A.to(dtype)).float().t()         # (out, r) = W Aᵀ, by the base itself
            else:                                                                 # its forward rounds: use the weight
                w_at = layer.backend.dequantize(layer.base_layer).float() @ A.t()
            cross = (B * w_at).sum(dim=1)
            quadratic = (B @ (A @ A.t()) * B).sum(dim=1)
            norm_sq = self.base_row_norm_sq(layer) + 2 * s * cross + s * s * quadratic
            return norm_sq.clamp_min(0).sqrt()

    def forward(self, layer: LoraLinear, name: str, result: Tensor, x: Tensor, dtype: torch.dtype) -> Tensor:
        """`result` (the base output) plus DoRA's term for adapter `name`."""
        A, B, s = layer.factors(name)
        dropout = layer.lora_dropout[name]
        dropped = dropout(x.to(dtype))
        lora = torch.nn.functional.linear(torch.nn.functional.linear(dropped, A.to(dtype)), B.to(dtype))  # (…, out)
        magnitude = layer.lora_magnitude_vector[name].weight
        scale = (magnitude.float() / self.row_norm(layer, name)).to(dtype)   # (out,)
        if isinstance(dropout, nn.Identity):
            bias = getattr(layer.base_layer, "bias", None)
            base = result if bias is None else result - bias.to(result.dtype)
        else:
            base = _base_without_bias(layer, dropped)                          # the magnitude sees dropped input too
        return result + ((scale - 1) * base.to(dtype) + scale * s * lora).to(result.dtype)

    def merged_weight(self, layer: LoraLinear, name: str, weight: Tensor) -> Tensor:
        """m ⊙ (W + ΔW) / ‖W + ΔW‖_row, fp32."""
        combined = weight.float() + layer.delta_weight(name).to(weight.device)
        magnitude = layer.lora_magnitude_vector[name].weight.float()
        return (magnitude / torch.linalg.vector_norm(combined, dim=1))[:, None] * combined

    def saved_keys(self, name: str) -> dict[str, str]:
        """A and B as plain LoRA, and the magnitude under PEFT's key (no `.weight`)."""
        return {**super().saved_keys(name), MAGNITUDE: f"{MAGNITUDE}.{name}.weight"}


def _base_without_bias(layer: LoraLinear, x: Tensor) -> Tensor:
    """The base's output for `x` (`LoraLinear.base_output`: the fused op's dequantization where it
    applies, else the module's own forward), minus its bias: x Wᵀ."""
    out = layer.base_output(x)
    bias = getattr(layer.base_layer, "bias", None)
    return out if bias is None else out - bias.to(out.dtype)
