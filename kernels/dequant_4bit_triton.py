"""Triton kernel for bitsandbytes' blockwise 4-bit layout (NF4/FP4), beside its torch twin.

Three names, as for every kernel here: `_dequantize_4bit_kernel` (the `@triton.jit` kernel),
`dequantize_4bit_triton` (the checked wrapper), and the pure-torch reference
`qlora_inject.kernels.dequant_4bit.dequantize_4bit_torch`. `dequant_4bit.dequantize_4bit`
imports this module (and so Triton) only for CUDA tensors. Double quantization's absmax is decoded
by the twin first (it is tiny: one value per 64 weights).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from qlora_inject.kernels.workspace import scratch_or_new

BLOCK = 1024


@triton.jit
def _dequantize_4bit_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, numel, blocksize, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)                # element indices
    mask = offsets < numel
    byte = tl.load(packed_ptr + offsets // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where(offsets % 2 == 0, (byte >> 4) & 0xF, byte & 0xF)      # first element: high nibble
    value = tl.load(code_ptr + nibble, mask=mask, other=0.0)
    scale = tl.load(absmax_ptr + offsets // blocksize, mask=mask, other=0.0)
    tl.store(out_ptr + offsets, (value * scale).to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_4bit_triton(packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int,
                           shape: tuple[int, ...], dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
    """Triton twin of `dequantize_4bit_torch`; same arguments, same result (written into `out` if given)."""
    numel = math.prod(shape)
    data = packed.contiguous().view(-1).view(torch.uint8)
    if data.numel() * 2 < numel:
        raise ValueError(f"packed storage holds {data.numel() * 2} codes, the shape {tuple(shape)} needs {numel}")
    if absmax.numel() * blocksize < numel:
        raise ValueError(f"{absmax.numel()} absmax blocks of {blocksize} cannot cover {numel} elements")
    if not (data.device == absmax.device == code.device):
        raise ValueError(f"packed, absmax and code must share a device; got {data.device}, {absmax.device}, "
                         f"{code.device}")
    out = scratch_or_new(out, numel, dtype, data.device)
    grid = (triton.cdiv(numel, BLOCK),)
    _dequantize_4bit_kernel[grid](data, absmax.float().contiguous(), code.float().contiguous(), out, numel,
                                  blocksize, BLOCK=BLOCK)
    return out.view(shape)
