"""GPTQ and AWQ dequantization in pure torch.

Both formats pack integer codes LSB-first into int32 words: code i of a packed run sits at bits
`[i·b, (i+1)·b)` of the run's little-endian words taken as one bit stream (3-bit codes straddle
words). GPTQ packs `qweight` along in_features (rows) and `qzeros` along out_features (columns);
AWQ's GEMM layout packs both along out_features, and at 4 bits stores the eight nibbles of a word
in the order [0, 2, 4, 6, 1, 3, 5, 7] of their columns.

    GPTQ:  W[:, j] = (q[j, :] − z[g_idx[j], :]) · s[g_idx[j], :]      then transposed to (out, in)
    AWQ:   Wᵀ[i, :] = (q[i, :] − z[i // g, :]) · s[i // g, :]
"""

from __future__ import annotations

import torch
from torch import Tensor

from qlora_inject.kernels import autotune, dequant_cpu, triton_runs

AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)   # logical column k of a word sits in nibble AWQ_REVERSE_ORDER[k]


def _use_numba(packed: Tensor, bits: int) -> bool:
    """The numba kernels run for CPU tensors at 2, 4 and 8 bits (codes that never straddle words)."""
    return packed.device.type == "cpu" and bits in (2, 4, 8) and dequant_cpu.available()


def _gptq_zeros(qzeros: Tensor, bits: int, out_features: int, zero_offset: int) -> Tensor:
    """GPTQ zero points, unpacked along out_features → int32 (groups, out)."""
    z = unpack_cols(qzeros, bits, out_features)
    return (z + zero_offset) & ((1 << bits) - 1) if zero_offset else z


def _word_positions(bits: int, interleaved: bool) -> tuple[int, ...]:
    """Where logical column j of a packed word sits (in units of `bits`)."""
    return AWQ_REVERSE_ORDER if interleaved else tuple(range(32 // bits))


def unpack_rows(packed: Tensor, bits: int, rows: int) -> Tensor:
    """Codes packed LSB-first along dim 0 of an int32 (words, cols) tensor → int32 (rows, cols).

    (HQQ packs rows differently, as slices of the code matrix: `dequant_hqq.unpack_row_slices`.)
    """
    words, cols = packed.shape
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        per_word = 32 // bits
        shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
        codes = (packed[:, None, :] >> shifts[None, :, None]) & mask               # (words, per_word, cols)
        return codes.reshape(words * per_word, cols)[:rows]
    # Bits that straddle words (3, 5, 6, 7): expand to a bit stream, then regroup.
    bit_index = torch.arange(32, device=packed.device, dtype=torch.int32)
    stream = ((packed[:, None, :] >> bit_index[None, :, None]) & 1).reshape(words * 32, cols)
    stream = stream[: rows * bits].reshape(rows, bits, cols)
    weights = (1 << torch.arange(bits, device=packed.device, dtype=torch.int32))[None, :, None]
    return (stream * weights).sum(dim=1, dtype=torch.int32)


def unpack_cols(packed: Tensor, bits: int, cols: int) -> Tensor:
    """Codes packed along dim 1 → int32 (rows, cols)."""
    return unpack_rows(packed.t(), bits, cols).t()


def dequantize_gptq(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int,
                    in_features: int, out_features: int, zero_offset: int = 0, out: Tensor | None = None) -> Tensor:
    """The dense (out, in) weight of a GPTQ layer, in `scales.dtype`: Triton on CUDA (4-bit), numba
    on CPU (2, 4, 8 bits), else the torch twin `dequantize_gptq_torch`.

    Args:
        zero_offset: 1 for checkpoints that store `zero − 1` (auto-gptq's "v1" convention), 0 for
            true zero points ("v2", what GPTQModel's trainable kernels hold in memory).
        out: Optional 1-D scratch the result may be written into (the result is then a view of it, in
            `out`'s dtype when that is fp32, holding the values of `scales.dtype`).
    """
    if bits == 4 and triton_runs(qweight):
        from qlora_inject.kernels.dequant_gptq_triton import dequantize_gptq4_triton

        return dequantize_gptq4_triton(qweight, qzeros, scales, g_idx, in_features, out_features, zero_offset, out=out)
    if _use_numba(qweight, bits) and qweight.shape[1] == out_features:
        zeros = _gptq_zeros(qzeros, bits, out_features, zero_offset)
        paths = dequant_cpu.candidates(
            lambda: dequant_cpu.gptq(qweight, zeros, scales, g_idx, bits, in_features, out).t())
        paths["torch"] = lambda: dequantize_gptq_torch(qweight, qzeros, scales, g_idx, bits, in_features,
                                                       out_features, zero_offset)
        key = autotune.shape_class(f"gptq{bits}", scales.dtype, in_features * out_features, out)
        return autotune.choose(key, paths)
    return dequantize_gptq_torch(qweight, qzeros, scales, g_idx, bits, in_features, out_features, zero_offset)


def dequantize_gptq_torch(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int,
                          in_features: int, out_features: int, zero_offset: int = 0) -> Tensor:
    """Pure-torch twin of `dequantize_gptq`: the reference the kernels are checked against."""
    q = unpack_rows(qweight, bits, in_features)                                     # (in, out)
    z = _gptq_zeros(qzeros, bits, out_features, zero_offset)                        # (groups, out)
    count = z.shape[0]
    size = -(-in_features // count)
    in_order = torch.arange(in_features, device=g_idx.device) // size
    if size * count == in_features and torch.equal(g_idx.long(), in_order):
        # Groups in order (no act-order): broadcast per group instead of gathering every row.
        grouped = (q.view(count, size, -1) - z[:, None, :]).to(scales.dtype) * scales[:, None, :]
        return grouped.view(in_features, -1).t()
    groups = g_idx.long()
    weight = (q - z[groups]).to(scales.dtype) * scales[groups]                      # (in, out)
    return weight.t()


def dequantize_awq_gemm(qweight: Tensor, qzeros: Tensor, scales: Tensor, bits: int, group_size: int,
                        out_features: int, interleaved: bool, out: Tensor | None = None) -> Tensor:
    """The dense (out, in) weight of an AWQ GEMM-layout layer, in `scales.dtype`: Triton on CUDA
    (4-bit interleaved), numba on CPU (2, 4, 8 bits), else the torch twin `dequantize_awq_gemm_torch`.

    Args:
        interleaved: True for the [0, 2, 4, 6, 1, 3, 5, 7] nibble order (AutoAWQ, and GPTQModel at
            4 bits); False for a plain LSB-first stream (GPTQModel at 2, 3 and 8 bits).
        out: Optional 1-D scratch the result may be written into (the result is then a view of it, in
            `out`'s dtype when that is fp32, holding the values of `scales.dtype`).
    """
    if bits == 4 and interleaved and triton_runs(qweight):
        from qlora_inject.kernels.dequant_gptq_triton import dequantize_awq4_triton

        return dequantize_awq4_triton(qweight, qzeros, scales, group_size, out_features, out=out)
    if _use_numba(qweight, bits) and qweight.shape[1] * (32 // bits) >= out_features:
        zeros = _unpack_words(qzeros, bits, out_features, interleaved)
        positions = _word_positions(bits, interleaved)
        paths = dequant_cpu.candidates(lambda: dequant_cpu.awq(qweight, zeros, scales, group_size, positions, bits,
                                                               out_features, out).t())
        paths["torch"] = lambda: dequantize_awq_gemm_torch(qweight, qzeros, scales, bits, group_size, out_features,
                                                           interleaved)
        key = autotune.shape_class(f"awq{bits}", scales.dtype, qweight.shape[0] * out_features, out)
        return autotune.choose(key, paths)
    return dequantize_awq_gemm_torch(qweight, qzeros, scales, bits, group_size, out_features, interleaved)


def dequantize_awq_gemm_torch(qweight: Tensor, qzeros: Tensor, scales: Tensor, bits: int, group_size: int,
                              out_features: int, interleaved: bool) -> Tensor:
    """Pure-torch twin of `dequantize_awq_gemm`: the reference the kernels are checked against."""
    if 32 % bits == 0:                                        # codes never straddle words: one pass each
        q = _unpack_words(qweight, bits, out_features, interleaved)                  # (in, out)
        z = _unpack_words(qzeros, bits, out_features, interleaved)                   # (groups, out)
    else:
        q = unpack_cols(qweight, bits, out_features)
        z = unpack_cols(qzeros, bits, out_features)
    in_features = q.shape[0]
    groups = -(-in_features // group_size)
    if groups * group_size == in_features:                    # broadcast per group instead of gathering rows
        grouped = (q.view(groups, group_size, -1) - z[:, None, :]).to(scales.dtype) * scales[:, None, :]
        return grouped.view(in_features, -1).t()
    rows = torch.arange(in_features, device=q.device) // group_size
    return ((q - z[rows]).to(scales.dtype) * scales[rows]).t()


def _unpack_words(packed: Tensor, bits: int, count: int, interleaved: bool) -> Tensor:
    """Codes packed along dim 1, `32 / bits` per int32 word → (rows, count) int32."""
    positions = torch.tensor(_word_positions(bits, interleaved), device=packed.device, dtype=torch.int32)
    codes = (packed[:, :, None] >> (positions * bits)) & ((1 << bits) - 1)         # (rows, words, per_word)
    return codes.reshape(packed.shape[0], -1)[:, :count]


def dequantize_awq_gemv(qweight: Tensor, qzeros: Tensor, scales: Tensor, bits: int, group_size: int,
                        in_features: int) -> Tensor:
    """The dense (out, in) weight of AutoAWQ's GEMV layout (packed along in_features, natural order)."""
    q = unpack_cols(qweight, bits, in_features)                                     # (out, in)
    groups_total = -(-in_features // group_size)
    z = unpack_cols(qzeros, bits, groups_total)                                     # (out, groups)
    groups = torch.arange(in_features, device=q.device) // group_size
    return (q - z[:, groups]).to(scales.dtype) * scales[:, :groups_total][:, groups]
