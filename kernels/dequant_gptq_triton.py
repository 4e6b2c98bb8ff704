"""Triton kernels for 4-bit GPTQ and AWQ (GEMM layout) dequantization, beside their torch twins.

`_dequantize_gptq4_kernel` / `dequantize_gptq4_triton` mirror `dequant_gptq.dequantize_gptq_torch` at
4 bits (any `g_idx`, either zero-point convention); `_dequantize_awq4_kernel` /
`dequantize_awq4_triton` mirror `dequant_gptq.dequantize_awq_gemm_torch` at 4 bits, interleaved. Each
program writes a tile of the dense (out, in) weight. Importing this module imports Triton: the
twins' dispatchers import it only for CUDA tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from qlora_inject.kernels.workspace import scratch_or_new

BLOCK_OUT = 32
BLOCK_IN = 32


@triton.jit
def _dequantize_gptq4_kernel(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, out_ptr, in_features, out_features,
                             zero_offset, BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)[:, None]    # output features (o)
    cols = tl.program_id(1) * BLOCK_IN + tl.arange(0, BLOCK_IN)[None, :]      # input features (i)
    mask = (rows < out_features) & (cols < in_features)
    word = tl.load(qweight_ptr + (cols // 8) * out_features + rows, mask=mask, other=0)
    q = (word >> ((cols % 8) * 4)) & 0xF
    group = tl.load(g_idx_ptr + cols, mask=cols < in_features, other=0)
    packed_zero = tl.load(qzeros_ptr + group * (out_features // 8) + rows // 8, mask=mask, other=0)
    z = (((packed_zero >> ((rows % 8) * 4)) & 0xF) + zero_offset) & 0xF
    scale = tl.load(scales_ptr + group * out_features + rows, mask=mask, other=0.0)
    value = (q - z).to(tl.float32) * scale.to(tl.float32)
    tl.store(out_ptr + rows * in_features + cols, value.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequantize_awq4_kernel(qweight_ptr, qzeros_ptr, scales_ptr, out_ptr, in_features, out_features, group_size,
                            BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)[:, None]    # output features (o)
    cols = tl.program_id(1) * BLOCK_IN + tl.arange(0, BLOCK_IN)[None, :]      # input features (i)
    mask = (rows < out_features) & (cols < in_features)
    within = rows % 8
    shift = ((within // 2) + 4 * (within % 2)) * 4                          # nibble of column j: [0,4,1,5,2,6,3,7][j]
    words = out_features // 8
    q = (tl.load(qweight_ptr + cols * words + rows // 8, mask=mask, other=0) >> shift) & 0xF
    group = cols // group_size
    z = (tl.load(qzeros_ptr + group * words + rows // 8, mask=mask, other=0) >> shift) & 0xF
    scale = tl.load(scales_ptr + group * out_features + rows, mask=mask, other=0.0)
    value = (q - z).to(tl.float32) * scale.to(tl.float32)
    tl.store(out_ptr + rows * in_features + cols, value.to(out_ptr.dtype.element_ty), mask=mask)


def _check(name: str, tensors: dict[str, Tensor], out_features: int) -> None:
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise ValueError(f"{name}: {sorted(tensors)} must share a device, got {devices}")
    if out_features % 8:
        raise ValueError(f"{name}: out_features={out_features} must be a multiple of 8 for 4-bit packing")


def dequantize_gptq4_triton(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, in_features: int,
                            out_features: int, zero_offset: int = 0, out: Tensor | None = None) -> Tensor:
    """Triton twin of `dequantize_gptq(..., bits=4, ...)`: the dense (out, in) weight in `scales.dtype`."""
    _check("dequantize_gptq4_triton", {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx},
           out_features)
    out = scratch_or_new(out, out_features * in_features, scales.dtype, qweight.device).view(out_features, in_features)
    grid = (triton.cdiv(out_features, BLOCK_OUT), triton.cdiv(in_features, BLOCK_IN))
    _dequantize_gptq4_kernel[grid](qweight.contiguous(), qzeros.contiguous(), scales.contiguous(),
                                   g_idx.to(torch.int32).contiguous(), out, in_features, out_features, zero_offset,
                                   BLOCK_OUT=BLOCK_OUT, BLOCK_IN=BLOCK_IN)
    return out


def dequantize_awq4_triton(qweight: Tensor, qzeros: Tensor, scales: Tensor, group_size: int,
                           out_features: int, out: Tensor | None = None) -> Tensor:
    """Triton twin of `dequantize_awq_gemm(..., bits=4, interleaved=True)`: (out, in) in `scales.dtype`."""
    _check("dequantize_awq4_triton", {"qweight": qweight, "qzeros": qzeros, "scales": scales}, out_features)
    in_features = qweight.shape[0]
    out = scratch_or_new(out, out_features * in_features, scales.dtype, qweight.device).view(out_features, in_features)
    grid = (triton.cdiv(out_features, BLOCK_OUT), triton.cdiv(in_features, BLOCK_IN))
    _dequantize_awq4_kernel[grid](qweight.contiguous(), qzeros.contiguous(), scales.contiguous(), out, in_features,
                                  out_features, group_size, BLOCK_OUT=BLOCK_OUT, BLOCK_IN=BLOCK_IN)
    return out
