"""Triton kernel for HQQ's 4-bit packing ("4bit_u8"), beside its torch twin `dequant_hqq.dequantize_hqq_torch`.

The packed rows hold the code matrix's first half in their high nibbles and its second half in
their low nibbles; zero and scale broadcast per code row (`axis == 1`) or per code column
(`axis == 0`). Quantized or offloaded meta data stays with the twin.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from qlora_inject.kernels.workspace import scratch_or_new

BLOCK = 1024


@triton.jit
def _dequantize_hqq4_kernel(packed_ptr, zero_ptr, scale_ptr, out_ptr, rows, cols, per_row, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)                # flat index into (rows, cols)
    mask = offsets < rows * cols
    row = offsets // cols
    col = offsets % cols
    half = rows // 2
    byte = tl.load(packed_ptr + (row % half) * cols + col, mask=mask, other=0).to(tl.int32)
    code = tl.where(row < half, (byte >> 4) & 0xF, byte & 0xF)
    meta = tl.where(per_row, row, col)
    zero = tl.load(zero_ptr + meta, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + meta, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, ((code.to(tl.float32) - zero) * scale).to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_hqq4_triton(W_q: Tensor, meta: dict, out: Tensor | None = None) -> Tensor:
    """Triton twin of `dequantize_hqq` for the "4bit_u8" packing with plain zero/scale tensors."""
    if meta.get("packing") != "4bit_u8" or meta.get("quant_zero") or meta.get("quant_scale") or "zero_scale" in meta:
        raise ValueError("dequantize_hqq4_triton reads the 4bit_u8 packing with plain zero/scale only; "
                         "use dequantize_hqq for the rest")
    packed = W_q.view(torch.uint8) if meta.get("view_as_float") else W_q
    rows, cols = packed.shape[0] * 2, packed.shape[1]
    dtype = meta.get("compute_dtype", torch.float16)
    out = scratch_or_new(out, rows * cols, dtype, packed.device)
    grid = (triton.cdiv(rows * cols, BLOCK),)
    _dequantize_hqq4_kernel[grid](packed.contiguous(), meta["zero"].contiguous().view(-1),
                                  meta["scale"].contiguous().view(-1), out, rows, cols, meta["axis"] == 1,
                                  BLOCK=BLOCK)
    return out.view(meta["shape"])
