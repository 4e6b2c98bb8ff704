"""LLM.int8 row-wise dequantization (bitsandbytes' `Linear8bitLt`): int8 rows `CB`, one scale per row `SCB`.

    W[r, :] = CB[r, :] · (SCB[r] · fp32(1/127))        (out, in), fp32

rounded as bitsandbytes' CPU training path rounds (the scale times 1/127 first, once per row).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from qlora_inject.kernels import autotune, dequant_cpu

_HALF = (torch.float16, torch.bfloat16)


def dequantize_int8_rowwise(codes: Tensor, row_scales: Tensor, out: Tensor | None = None) -> Tensor:
    """The dense (out, in) weight: on CPU the fastest of the numba kernel and the torch twin, measured
    per shape class (`autotune`); the twin elsewhere.

    Args:
        codes: int8 (out, in) rows.
        row_scales: (out,) absolute row maxima.
        out: Optional 1-D scratch the result may be written into: an fp16/bf16 one receives the fp32
            values rounded to it (the twin's `.to(out.dtype)`), an fp32 one the values themselves.
    """
    dtype = out.dtype if out is not None and out.dtype in _HALF else torch.float32

    def twin() -> Tensor:
        return dequantize_int8_rowwise_torch(codes, row_scales).to(dtype)

    if codes.device.type != "cpu" or not dequant_cpu.available():
        return twin()
    paths: dict[str, Callable[[], Tensor]] = dequant_cpu.candidates(
        lambda: dequant_cpu.rowwise_int8(codes, row_scales, out, dtype))
    paths["torch"] = twin
    return autotune.choose(autotune.shape_class("int8", dtype, codes.numel(), out), paths)


def dequantize_int8_rowwise_torch(codes: Tensor, row_scales: Tensor) -> Tensor:
    """Pure-torch twin of `dequantize_int8_rowwise`: fp32 (out, in)."""
    return codes.float() * (row_scales.float()[:, None] * (1.0 / 127.0))
