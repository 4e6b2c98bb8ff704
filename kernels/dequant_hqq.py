"""HQQ dequantization in pure torch: unpack `W_q` row-slices, then `(W_q − zero) · scale`.

HQQ packs codes by slicing the code matrix along dim 0: with k codes per storage word, rows
`[i·n/k, (i+1)·n/k)` go to bits `(k−1−i)·b … (k−i)·b − 1` of the packed rows (slice 0 in the high
bits). 3-bit codes go ten to an int32 (rows padded to a multiple of ten). The code matrix is the
weight viewed as (−1, group_size) when `axis == 1`, or (group_size, −1) when `axis == 0`, and
zero/scale broadcast against it. Quantized meta data (`zero_q`/`scale_q` with their own meta) and
offloaded meta (`zero_scale`, both stacked) are read too.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qlora_inject.kernels import autotune, dequant_cpu, triton_runs

# packing name → (bits per code, codes per storage word)
PACKINGS = {
    "8bit_u8": (8, 1),
    "4bit_u8": (4, 2),
    "2bit_u8": (2, 4),
    "1bit_u8": (1, 8),
    "3bit_32": (3, 10),
}


def unpack_row_slices(packed: Tensor, packing: str) -> Tensor:
    """Undo HQQ's row-slice bit packing; returns the codes (rows × k, cols), same integer dtype."""
    if packing not in PACKINGS:
        raise ValueError(f"unknown HQQ packing {packing!r}; known: {sorted(PACKINGS)}")
    bits, per_word = PACKINGS[packing]
    if per_word == 1:
        return packed
    mask = (1 << bits) - 1
    return torch.cat([(packed >> ((per_word - 1 - i) * bits)) & mask for i in range(per_word)], dim=0)


def code_rows(meta: dict) -> int:
    """Rows of the unpadded code matrix."""
    numel = math.prod(meta["shape"])
    return meta["group_size"] if meta["axis"] == 0 else numel // meta["group_size"]


def dequantize_hqq(W_q: Tensor, meta: dict, out: Tensor | None = None) -> Tensor:
    """The dense weight of shape `meta["shape"]`, in `meta["compute_dtype"]` (fp16 if absent).

    The 4-bit packing with plain zero/scale runs as a Triton kernel on CUDA and as a numba kernel on
    CPU (zero and scale in the compute dtype); everything else as the torch twin `dequantize_hqq_torch`.
    `out` is an optional 1-D scratch the result may be written into (the result is then a view of it).
    """
    plain_4bit = (meta.get("packing") == "4bit_u8" and not meta.get("quant_zero") and not meta.get("quant_scale")
                  and "zero_scale" not in meta)
    if plain_4bit and triton_runs(W_q):
        from qlora_inject.kernels.dequant_hqq_triton import dequantize_hqq4_triton

        return dequantize_hqq4_triton(W_q, meta, out=out)
    dtype = meta.get("compute_dtype", torch.float16)
    if (plain_4bit and W_q.device.type == "cpu" and dtype in (torch.float32, torch.float16, torch.bfloat16)
            and meta["zero"].dtype == meta["scale"].dtype == dtype and dequant_cpu.available()):
        packed = W_q.view(torch.uint8) if meta.get("view_as_float") else W_q
        paths = dequant_cpu.candidates(lambda: dequant_cpu.hqq_4bit(packed, meta["zero"], meta["scale"],
                                                                    code_rows(meta), out, dtype).view(meta["shape"]))
        paths["torch"] = lambda: dequantize_hqq_torch(W_q, meta)
        return autotune.choose(autotune.shape_class("hqq4", dtype, math.prod(meta["shape"]), out), paths)
    return dequantize_hqq_torch(W_q, meta)


def dequantize_hqq_torch(W_q: Tensor, meta: dict) -> Tensor:
    """Pure-torch twin of `dequantize_hqq` (every packing and meta form): the kernels' reference."""
    dtype = meta.get("compute_dtype", torch.float16)
    zero, scale = _zero_and_scale(meta, W_q.device)
    if meta["packing"]:
        stored = W_q.view(_unpack_view_dtype(meta)) if meta.get("view_as_float") else W_q
        codes = unpack_row_slices(stored, meta["packing"])[: code_rows(meta)].to(dtype)   # (rows, cols)
    else:
        codes = W_q.to(dtype)
    return ((codes - zero) * scale).reshape(meta["shape"])


def _unpack_view_dtype(meta: dict) -> torch.dtype:
    return meta.get("unpack_view_dtype") or (torch.int32 if meta["packing"] == "3bit_32" else torch.uint8)


def _zero_and_scale(meta: dict, device: torch.device) -> tuple[Tensor, Tensor]:
    zero, scale = meta.get("zero"), meta.get("scale")
    zero_q, scale_q = meta.get("zero_q"), meta.get("scale_q")
    if "zero_scale" in meta:                                               # offloaded: both stacked
        stacked = meta["zero_scale"].to(device)
        if stacked.dtype == torch.uint8:
            zero_q, scale_q = stacked[0], stacked[1]
        else:
            zero, scale = stacked[0], stacked[1]
    if meta.get("quant_zero"):
        zero = dequantize_hqq(zero_q.to(device), meta["meta_zero"])
    if meta.get("quant_scale"):
        scale = dequantize_hqq(scale_q.to(device), meta["meta_scale"])
    return zero, scale
