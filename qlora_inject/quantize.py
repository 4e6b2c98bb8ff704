"""Quantize dense `nn.Linear` layers into a format, with each format's own library.

For benchmarks, the command line, and users who want a quantized base without a pre-quantized
checkpoint. Each format quantizes in its own backend file (`Backend.quantize`); this module picks
the backend by the user's name for the format and holds the pieces formats share: round-to-nearest
grouping (GPTQ and AWQ here are round-to-nearest, per-group min-max, no calibration data, packed by
the owning library: the same layout as a calibrated checkpoint, a larger error) and dense copies.
"""

from __future__ import annotations

import torch
from torch import nn

from qlora_inject.registry import format_for


def quantize_linear(linear: nn.Linear, quant: str, **options) -> nn.Module:
    """A new quantized layer holding `linear`'s weight (and bias) in the format users call `quant`.

    Args:
        linear: The dense layer; left as it is.
        quant: A format name (`registry.quant_names()`: nf4, fp4, int8, hqq, gptq, awq, and any registered).
        options: For the format's `quantize` (defaults there): `compute_dtype`, `group_size` (HQQ 64, GPTQ and
            AWQ 128; bitsandbytes 4-bit uses its blocksize of 64), `bits` (HQQ, GPTQ, AWQ: 4), `device` ("cpu";
            bitsandbytes quantizes when moved there).
    """
    return format_for(quant).quantize(linear, quant, **options)


def rtn_groupwise(weight: torch.Tensor, bits: int, groups: torch.Tensor, sym: bool):
    """Round-to-nearest per (row, group) with min-max ranges.

    Args:
        weight: (out, in) float weight.
        groups: (in,) group index of each input column.
        sym: Symmetric (zero fixed at 2^(bits−1)) or asymmetric (zero from the range).

    Returns:
        `(scales, zeros, dequantized)`: scales and zeros (out, groups), the fp16-rounded scales as
        the packed layer stores them, and the (out, in) weight those codes stand for.
    """
    weight = weight.float()
    maxq = 2**bits - 1
    count = int(groups.max()) + 1
    low = torch.empty(weight.shape[0], count)                                   # (out, groups)
    high = torch.empty(weight.shape[0], count)
    for group in range(count):                                                  # act-order groups are scattered
        columns = weight[:, groups == group]
        low[:, group] = columns.amin(dim=1).clamp(max=0)
        high[:, group] = columns.amax(dim=1).clamp(min=0)
    if sym:
        scales = (2 * torch.maximum(low.abs(), high) / maxq).clamp(min=1e-8)
        zeros = torch.full_like(scales, (maxq + 1) // 2)
    else:
        scales = ((high - low) / maxq).clamp(min=1e-8)
        zeros = torch.round(-low / scales).clamp(0, maxq)
    scales = scales.half().float()
    column_scales, column_zeros = scales[:, groups.long()], zeros[:, groups.long()]
    codes = torch.clamp(torch.round(weight / column_scales + column_zeros), 0, maxq)
    return scales, zeros, (codes - column_zeros) * column_scales


def linear_from(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> nn.Linear:
    """An `nn.Linear` holding copies of `weight` (out, in) and `bias`, in `dtype` on `device` (default CPU fp32)."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, dtype=dtype, device=device)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def float_copy(linear: nn.Linear) -> nn.Linear:
    """A CPU fp32 `nn.Linear` copy of `linear` (weight and bias), what the formats' own quantizers read."""
    return linear_from(linear.weight.detach(), None if linear.bias is None else linear.bias.detach())


def quantize_model(model: nn.Module, quant: str, *, skip: tuple[str, ...] = ("lm_head",), **options) -> nn.Module:
    """Replace every `nn.Linear` of `model` (but those named in `skip`) by its form in format `quant`, in place.

    `quant` is a name from `registry.quant_names()`; `none` leaves the model as it is. `options` go to
    `quantize_linear`.
    """
    backend = format_for(quant)
    if backend.name == "dense":
        return model
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and name.split(".")[-1] not in skip]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, backend.quantize(module, quant, **options))
    return model


def default_group_size(config) -> int:
    """32 for a small model (hidden < 512), else the largest of 128 and 64 that divides every layer's input
    width (AWQ needs it), else 32."""
    widths = (config.hidden_size, getattr(config, "intermediate_size", config.hidden_size))
    if config.hidden_size < 512:
        return 32
    return next((size for size in (128, 64) if all(width % size == 0 for width in widths)), 32)
