"""Small layers and models built by the real libraries, for tests.

Every factory builds from a fixed dense weight, so two calls give bit-identical modules:
that is how a layer is handed to both this library and PEFT.
"""

from __future__ import annotations

import tempfile
from functools import cache
from pathlib import Path

import torch
from torch import nn

# in_features a multiple of the 4-bit blocksize: bitsandbytes 0.50's CPU dequantize_4bit mis-reads
# blocks that straddle rows (see tests/backends/test_bnb.py), as real model shapes never do.
IN_FEATURES, OUT_FEATURES = 128, 64


def dense_weight(out_features: int = OUT_FEATURES, in_features: int = IN_FEATURES) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    return torch.randn(out_features, in_features, generator=generator) / in_features**0.5


def dense_bias(out_features: int = OUT_FEATURES) -> torch.Tensor:
    return torch.randn(out_features, generator=torch.Generator().manual_seed(99)) * 0.1


def make_dense(dtype: torch.dtype = torch.float32, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(IN_FEATURES, OUT_FEATURES, bias=bias, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(dense_weight())
        if bias:
            layer.bias.copy_(dense_bias())
    return layer


def make_bnb4(quant_type: str = "nf4", double_quant: bool = True, dtype: torch.dtype = torch.float32,
              quant_storage: torch.dtype = torch.uint8, bias: bool = True,
              out_features: int = OUT_FEATURES) -> nn.Module:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(IN_FEATURES, out_features, bias=bias, compute_dtype=dtype, quant_type=quant_type,
                              compress_statistics=double_quant, quant_storage=quant_storage)
    layer.weight = bnb.nn.Params4bit(dense_weight(out_features).to(dtype), requires_grad=False,
                                     quant_type=quant_type, compress_statistics=double_quant,
                                     quant_storage=quant_storage)
    if bias:
        layer.bias = nn.Parameter(dense_bias(out_features).to(dtype), requires_grad=False)
    return layer.to("cpu")                                                   # bnb quantizes here


def make_bnb8(threshold: float = 0.0, bias: bool = True) -> nn.Module:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear8bitLt(IN_FEATURES, OUT_FEATURES, bias=bias, has_fp16_weights=False, threshold=threshold)
    layer.weight = bnb.nn.Int8Params(dense_weight().half(), requires_grad=False, has_fp16_weights=False)
    if bias:
        layer.bias = nn.Parameter(dense_bias(), requires_grad=False)
    return layer.to("cpu")


class Holder(nn.Module):
    """One layer under the name `proj`, so PEFT and this library can both target it."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@cache
def tiny_llama_dir() -> Path:
    """A saved Llama-architecture model with random weights (2 layers, hidden 64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    directory = Path(tempfile.mkdtemp(prefix="tiny-llama-"))
    model.save_pretrained(directory)
    return directory


def load_tiny_llama(quant: str = "none", compute_dtype: torch.dtype = torch.float32,
                    dtype: torch.dtype | None = None) -> nn.Module:
    """The tiny Llama in format `quant`, loaded as the library loads that format (`pretrained.load_model`:
    bitsandbytes through transformers, on the CPU, never repacked; the others quantized by their library).

    `compute_dtype` is the quantized layers' compute dtype; `dtype`, where given, the activations' (the
    non-quantized weights' dtype, transformers' `dtype=`)."""
    from qlora_inject.pretrained import load_model

    return load_model(tiny_llama_dir(), quant, compute_dtype=compute_dtype, dtype=dtype)


def make_hqq(nbits: int = 4, group_size: int = 64, axis: int = 1, dtype: torch.dtype = torch.bfloat16,
             bias: bool = True) -> nn.Module:
    """An `HQQLinear` quantized by hqq itself, on the CPU."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    return HQQLinear(make_dense(torch.float32, bias), BaseQuantizeConfig(nbits=nbits, group_size=group_size, axis=axis),
                     compute_dtype=dtype, device="cpu")


def make_gptq(bits: int = 4, group_size: int = 32, sym: bool = True, act_order: bool = False,
              dtype: torch.dtype = torch.float16) -> nn.Module:
    """A GPTQModel `TorchLinear` packed by GPTQModel (true zero points)."""
    from qlora_inject.backends.gptq import gptq_linear

    g_idx = torch.arange(IN_FEATURES, dtype=torch.int32) // (IN_FEATURES if group_size == -1 else group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(IN_FEATURES, generator=torch.Generator().manual_seed(7))].contiguous()
    layer = gptq_linear(make_dense(), bits, group_size, sym, act_order, g_idx=g_idx)
    return _with_scales_dtype(layer, dtype)


def make_awq(bits: int = 4, group_size: int = 32, dtype: torch.dtype = torch.float16) -> nn.Module:
    """A GPTQModel `AwqTorchLinear` (GEMM layout) packed by GPTQModel."""
    from qlora_inject.backends.awq import awq_linear

    return _with_scales_dtype(awq_linear(make_dense(), bits, group_size), dtype)


def autoawq_quantized(group_size: int):
    """Scales, zeros (out, groups) and the grid weight for AutoAWQ's `from_linear`."""
    from qlora_inject.quantize import rtn_groupwise

    groups = torch.arange(IN_FEATURES) // group_size
    return rtn_groupwise(dense_weight(), 4, groups, sym=False)


def make_autoawq(layout: str = "gemm", group_size: int = 32, dtype: torch.dtype = torch.float16) -> nn.Module:
    """AutoAWQ's `WQLinear_GEMM` or `WQLinear_GEMV`, packed by AutoAWQ's `from_linear`."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from awq.modules.linear.gemm import WQLinear_GEMM
        from awq.modules.linear.gemv import WQLinear_GEMV
    scales, zeros, grid = autoawq_quantized(group_size)
    source = make_dense()
    with torch.no_grad():
        source.weight.copy_(grid)                   # from_linear does not clamp codes: give it grid values
    if layout == "gemm":
        layer = WQLinear_GEMM.from_linear(source, 4, group_size, scales=scales.t().contiguous(),
                                          zeros=zeros.t().contiguous())
    else:
        layer = WQLinear_GEMV.from_linear(source, 4, group_size, scales=scales, zeros=zeros)
    return _with_scales_dtype(layer, dtype)


def _with_scales_dtype(layer: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store scales and bias in `dtype` (checkpoints hold fp16; bf16 models keep bf16 scales)."""
    layer.scales = layer.scales.to(dtype)
    if getattr(layer, "bias", None) is not None:
        layer.bias = layer.bias.detach().to(dtype)
    return layer


# The built-in formats' small layers, each built directly by its library with the tests' settings, and
# variants of them (outlier threshold, act-order, AutoAWQ's own module), with the package each needs.
BUILT_IN_LAYERS = {
    "dense": (lambda: make_dense(), None),
    "nf4": (lambda: make_bnb4("nf4", True), "bitsandbytes"),
    "fp4": (lambda: make_bnb4("fp4", False), "bitsandbytes"),
    "int8": (lambda: make_bnb8(0.0), "bitsandbytes"),
    "int8-outliers": (lambda: make_bnb8(6.0), "bitsandbytes"),
    "hqq": (lambda: make_hqq(4, 64, 1, torch.float32), "hqq"),
    "gptq": (lambda: make_gptq(4, 32, dtype=torch.float32), "gptqmodel"),
    "gptq-act-order": (lambda: make_gptq(4, 32, sym=False, act_order=True, dtype=torch.float32), "gptqmodel"),
    "awq": (lambda: make_awq(4, 32, dtype=torch.float32), "gptqmodel"),
    "autoawq": (lambda: make_autoawq("gemm", 32, dtype=torch.float32), "awq"),
}


def _format_layers() -> dict:
    """One small layer per registered format (`quantize_linear` of the fixed dense weight) and the package it
    needs, the built-ins' taken from above: a format registered before the tests are collected (a plugin,
    e.g. `pytest -p toy_format`) is in every test parametrised over `FORMAT_LAYERS`."""
    from qlora_inject.quantize import quantize_linear
    from qlora_inject.registry import format_for, quantized_names

    derived = {quant: (lambda q=quant: quantize_linear(make_dense(), q, group_size=32), format_for(quant).package)
               for quant in quantized_names()}
    return {**BUILT_IN_LAYERS, **{quant: entry for quant, entry in derived.items() if quant not in BUILT_IN_LAYERS}}


FORMAT_LAYERS = _format_layers()

def registered_formats() -> tuple[str, ...]:
    """Every registered format by the name `FORMAT_LAYERS` gives it: `dense`, then each quantized format's names
    (no variants)."""
    from qlora_inject.registry import quantized_names

    return ("dense", *quantized_names())


def quant_params(*names: str) -> list:
    """pytest params for these format names as users give them (`load_tiny_llama`, `--quant`; default: every
    registered one), each skipped where the library its format needs (the registry says which) is missing."""
    import pytest

    from qlora_inject.registry import format_for, quant_names

    from conftest import requires

    packages = {name: format_for(name).package for name in names or quant_names()}
    return [pytest.param(name, marks=requires(package) if package else ()) for name, package in packages.items()]


def format_params(*names: str) -> list:
    """pytest params for these formats, each skipped (with a reason) where its library is missing."""
    import pytest

    from conftest import requires

    return [pytest.param(name, marks=requires(FORMAT_LAYERS[name][1]) if FORMAT_LAYERS[name][1] else ())
            for name in names]
