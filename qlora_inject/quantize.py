"""Quantize dense `nn.Linear` layers into a format, with each format's own library.

For benchmarks, the command line, and users who want a quantized base without a pre-quantized
checkpoint. GPTQ and AWQ here are round-to-nearest (per-group min-max, no calibration data),
packed by the owning library: the same layout as a calibrated checkpoint, a larger error.
"""

from __future__ import annotations

import torch
from torch import nn

FORMATS = ("nf4", "fp4", "int8", "hqq")


def quantize_linear(linear: nn.Linear, fmt: str, *, compute_dtype: torch.dtype = torch.float32,
                    group_size: int = 64, bits: int = 4, device: str | torch.device = "cpu") -> nn.Module:
    """A new quantized layer holding `linear`'s weight (and bias) in format `fmt`.

    Args:
        linear: The dense layer; left as it is.
        fmt: One of `FORMATS`.
        compute_dtype: The dtype the quantized layer computes in.
        group_size: Group size for HQQ (bitsandbytes 4-bit uses its blocksize of 64).
        bits: Bits for HQQ.
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
    raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")


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
