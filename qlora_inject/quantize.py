"""Quantize dense `nn.Linear` layers into a format, with each format's own library.

For benchmarks, the command line, and users who want a quantized base without a pre-quantized
checkpoint. GPTQ and AWQ here are round-to-nearest (per-group min-max, no calibration data),
packed by the owning library: the same layout as a calibrated checkpoint, a larger error.
"""

from __future__ import annotations

import torch
from torch import nn

FORMATS = ("nf4", "fp4", "int8", "hqq", "gptq", "awq")


def quantize_linear(linear: nn.Linear, fmt: str, *, compute_dtype: torch.dtype = torch.float32,
                    group_size: int = 64, bits: int = 4, device: str | torch.device = "cpu") -> nn.Module:
    """A new quantized layer holding `linear`'s weight (and bias) in format `fmt`.

    Args:
        linear: The dense layer; left as it is.
        fmt: One of `FORMATS`.
        compute_dtype: The dtype the quantized layer computes in.
        group_size: Group size for HQQ, GPTQ and AWQ (bitsandbytes 4-bit uses its blocksize of 64).
        bits: Bits for HQQ, GPTQ and AWQ.
        device: Where the quantized layer lives (bitsandbytes quantizes when moved there).
    """
    weight = linear.weight.detach()
    bias = None if linear.bias is None else linear.bias.detach()
    if fmt in ("nf4", "fp4"):
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias is not None,
                                  compute_dtype=compute_dtype, quant_type=fmt, compress_statistics=True,
                                  device="meta")
        layer.weight = bnb.nn.Params4bit(weight.to("cpu", compute_dtype), requires_grad=False, quant_type=fmt,
                                         compress_statistics=True)
        if bias is not None:
            layer.bias = nn.Parameter(bias.to(compute_dtype).clone(), requires_grad=False)
        return layer.to(device)
    if fmt == "int8":
        import bitsandbytes as bnb

        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias is not None,
                                    has_fp16_weights=False, threshold=0.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight.to("cpu", torch.float16), requires_grad=False, has_fp16_weights=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias.clone(), requires_grad=False)
        return layer.to(device)
    if fmt == "hqq":
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        source = nn.Linear(linear.in_features, linear.out_features, bias=bias is not None)
        with torch.no_grad():
            source.weight.copy_(weight)
            if bias is not None:
                source.bias.copy_(bias)
        return HQQLinear(source, BaseQuantizeConfig(nbits=bits, group_size=group_size), compute_dtype=compute_dtype,
                         device=str(device))
    if fmt == "gptq":
        return gptq_linear(linear, bits=bits, group_size=group_size).to(device)
    if fmt == "awq":
        return awq_linear(linear, bits=bits, group_size=group_size).to(device)
    raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")


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


def gptq_linear(linear: nn.Linear, bits: int = 4, group_size: int = 128, sym: bool = True, desc_act: bool = False,
                g_idx: torch.Tensor | None = None) -> nn.Module:
    """A GPTQModel `TorchLinear` (true zero points, trainable on every device) packed by GPTQModel."""
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    in_features, out_features = linear.in_features, linear.out_features
    if g_idx is None:
        g_idx = torch.arange(in_features, dtype=torch.int32) // (in_features if group_size == -1 else group_size)
    scales, zeros, _ = rtn_groupwise(linear.weight.detach(), bits, g_idx, sym)
    layer = TorchLinear(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, in_features=in_features,
                        out_features=out_features, bias=linear.bias is not None, pack_dtype=torch.int32)
    with torch.no_grad():
        layer.pack_original(_cpu_float_copy(linear), scales, zeros, g_idx.to(torch.int32))
    layer.optimized = True                                   # no torch.compile of its dequantizer
    layer.post_init()
    return layer


def awq_linear(linear: nn.Linear, bits: int = 4, group_size: int = 128) -> nn.Module:
    """A GPTQModel `AwqTorchLinear` (GEMM layout, trainable on every device) packed by GPTQModel."""
    from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear

    in_features, out_features = linear.in_features, linear.out_features
    size = in_features if group_size == -1 else group_size
    groups = torch.arange(in_features) // size
    scales, zeros, dequantized = rtn_groupwise(linear.weight.detach(), bits, groups, sym=False)
    source = _cpu_float_copy(linear)
    with torch.no_grad():
        source.weight.copy_(dequantized)                     # AWQ's pack does not clamp: give it the grid values
    layer = AwqTorchLinear(bits=bits, group_size=group_size, sym=False, desc_act=False, in_features=in_features,
                           out_features=out_features, bias=linear.bias is not None, register_buffers=True)
    with torch.no_grad():
        layer.pack(source, scales, zeros)
    layer.post_init()
    return layer


def requantize_like_gptq(module: nn.Module, weight: torch.Tensor, zero_offset: int) -> nn.Module:
    """A GPTQModel `TorchLinear` with `module`'s bits, groups (same `g_idx`) and symmetry, holding `weight`."""
    source = linear_from(weight, getattr(module, "bias", None))
    group_size = getattr(module, "requested_group_size", None) or module.group_size
    return gptq_linear(source, bits=module.bits, group_size=group_size, sym=bool(getattr(module, "sym", True)),
                       desc_act=bool(getattr(module, "desc_act", False)), g_idx=module.g_idx.cpu()
                       ).to(module.qweight.device)


def requantize_like_awq(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A GPTQModel `AwqTorchLinear` with `module`'s bits and group size, holding `weight`."""
    source = linear_from(weight, getattr(module, "bias", None))
    bits = int(getattr(module, "w_bit", None) or module.bits)
    return awq_linear(source, bits=bits, group_size=module.group_size).to(module.qweight.device)


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


def _cpu_float_copy(linear: nn.Linear) -> nn.Linear:
    return linear_from(linear.weight.detach(), None if linear.bias is None else linear.bias.detach())


def quantize_model(model: nn.Module, fmt: str, *, skip: tuple[str, ...] = ("lm_head",), **options) -> nn.Module:
    """Replace every `nn.Linear` of `model` (but those named in `skip`) by its quantized form, in place."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and name.split(".")[-1] not in skip]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, quantize_linear(module, fmt, **options))
    return model
