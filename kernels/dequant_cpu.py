"""CPU dequantization kernels, compiled with numba: the fast path beside each pure-torch twin.

A torch twin runs several full passes over the weight (unpack, gather, subtract, scale), each
writing a tensor as large as the dense weight; on a CPU that costs 100–200 ms for a 4096 × 11008
layer, more than the layer's matmul. These kernels make one parallel pass that writes each fp32
element once (NF4 about 7 ms there, bitsandbytes' own C++ about 40 ms).

Every kernel computes exactly what its twin computes, in fp32, so the results are bit-identical:
the twins stay the oracle (tests compare the two), and the dispatchers in `dequant_4bit`,
`dequant_gptq` and `dequant_hqq` pick these on CPU when numba is installed. Outputs go into a
caller-given fp32 scratch (the shared workspace of `kernels.workspace`) or a new tensor.
Layouts follow the packing: NF4/FP4, int8 and HQQ write (out, in) row-major; GPTQ and AWQ, which
pack along out_features, write (in, out) and the dispatcher returns its transpose (a view).
"""

from __future__ import annotations

import functools
import importlib.util
import warnings

import torch
from torch import Tensor

from qlora_inject.kernels.workspace import scratch_or_new


@functools.cache
def available() -> bool:
    """True when numba imports (the kernels compile on first use, then come from its cache).

    A numba that is installed but fails to import (say, built for another numpy) is reported once
    and the torch twins are used instead.
    """
    if importlib.util.find_spec("numba") is None:
        return False                                                        # not installed: no warning
    try:
        import numba  # noqa: F401
    except Exception as err:                                                # any import failure: fall back
        warnings.warn(f"numba is installed but does not import ({err}); dequantizing on the CPU with the "
                      "slower torch twins instead. Reinstall it: pip install --force-reinstall numba",
                      RuntimeWarning, stacklevel=2)
        return False
    return True


@functools.cache
def _kernels():
    import numba
    import numpy as np

    jit = functools.partial(numba.njit, parallel=True, cache=True, nogil=True)

    @numba.njit(cache=True, inline="always")
    def round_to(values, mode):
        # Round fp32 values in place to the nearest fp16 (mode 1) or bf16 (mode 2) value, ties to
        # even, as torch's `.to(dtype)` does: the result stays fp32 but holds the narrower value.
        if mode == 0:
            return
        bits = values.view(np.uint32)
        for k in range(values.shape[0]):
            u = bits[k]
            if mode == 2:
                bits[k] = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
            elif ((u >> np.uint32(23)) & np.uint32(0xFF)) >= np.uint32(113):          # fp16 normal range
                r = (u + np.uint32(0xFFF) + ((u >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)
                if (r & np.uint32(0x7FFFFFFF)) > np.uint32(0x477FE000):                  # past 65504: inf
                    r = (u & np.uint32(0x80000000)) | np.uint32(0x7F800000)
                bits[k] = r
            else:                                                   # fp16 subnormals: multiples of 2^-24
                values[k] = np.rint(values[k] * np.float32(16777216.0)) * np.float32(5.9604645e-08)

    @jit
    def blockwise_4bit(packed, absmax, pairs, blocksize, numel, mode, out):
        # Element i = code[q_i] · absmax[i // blocksize]; byte j holds q_2j (high nibble) and q_2j+1.
        # `pairs` is the 256 × 2 table of (code[b >> 4], code[b & 15]): one lookup row per byte.
        for block in numba.prange(absmax.shape[0]):
            scale = absmax[block]
            start = block * blocksize
            end = min(start + blocksize, numel)
            for j in range(start >> 1, end >> 1):
                byte = packed[j]
                out[2 * j] = pairs[byte, 0] * scale
                out[2 * j + 1] = pairs[byte, 1] * scale
            if end & 1:                                                 # an odd last element: high nibble only
                out[end - 1] = pairs[packed[end >> 1], 0] * scale
            round_to(out[start:end], mode)

    @jit
    def rowwise_int8(codes, row_scales, out):
        for row in numba.prange(codes.shape[0]):
            factor = np.float32(row_scales[row]) * np.float32(1.0 / 127.0)    # bitsandbytes' rounding
            for col in range(codes.shape[1]):
                out[row, col] = np.float32(codes[row, col]) * factor

    @jit
    def gptq(qweight, zeros, scales, g_idx, bits, mode, out):
        # out (in, out_features): (q[i, o] − z[g[i], o]) · s[g[i], o]; q packed along in (dim 0).
        per_word = 32 // bits
        mask = (1 << bits) - 1
        for i in numba.prange(out.shape[0]):
            group = g_idx[i]
            word = i // per_word
            shift = (i % per_word) * bits
            for o in range(out.shape[1]):
                code = (qweight[word, o] >> shift) & mask
                out[i, o] = np.float32(code - zeros[group, o]) * scales[group, o]
            round_to(out[i], mode)

    @jit
    def awq(qweight, zeros, scales, group_size, positions, bits, mode, out):
        # out (in, out_features): (q[i, o] − z[i // g, o]) · s[i // g, o]; q packed along out (dim 1).
        per_word = 32 // bits
        mask = (1 << bits) - 1
        out_features = out.shape[1]
        full_words = out_features // per_word
        for i in numba.prange(out.shape[0]):
            group = i // group_size
            if per_word == 8:                                           # 4-bit: a fixed trip count unrolls
                for w in range(full_words):
                    word = qweight[i, w]
                    for j in range(8):
                        o = w * 8 + j
                        code = (word >> (positions[j] * 4)) & 15
                        out[i, o] = np.float32(code - zeros[group, o]) * scales[group, o]
            else:
                for w in range(full_words):
                    word = qweight[i, w]
                    for j in range(per_word):
                        o = w * per_word + j
                        code = (word >> (positions[j] * bits)) & mask
                        out[i, o] = np.float32(code - zeros[group, o]) * scales[group, o]
            for o in range(full_words * per_word, out_features):            # a partly used last word
                code = (qweight[i, full_words] >> (positions[o % per_word] * bits)) & mask
                out[i, o] = np.float32(code - zeros[group, o]) * scales[group, o]
            round_to(out[i], mode)

    @jit
    def hqq_4bit(packed, zero, scale, rows, out):
        # Code row r is the high nibble of packed row r (r < half) or the low nibble of row r − half.
        half = packed.shape[0]
        zero_rows = 1 if zero.shape[0] > 1 else 0                           # broadcast strides: 1, or 0
        zero_cols = 1 if zero.shape[1] > 1 else 0
        scale_rows = 1 if scale.shape[0] > 1 else 0
        scale_cols = 1 if scale.shape[1] > 1 else 0
        for r in numba.prange(rows):
            source = r % half
            shift = 4 if r < half else 0
            if zero_cols == 0 and scale_cols == 0:                      # axis 1: one zero/scale per row
                z = zero[r * zero_rows, 0]
                s = scale[r * scale_rows, 0]
                for c in range(packed.shape[1]):
                    out[r, c] = (np.float32((packed[source, c] >> shift) & 15) - z) * s
            else:
                for c in range(packed.shape[1]):
                    code = np.float32((packed[source, c] >> shift) & 15)
                    out[r, c] = (code - zero[r * zero_rows, c * zero_cols]) * scale[r * scale_rows, c * scale_cols]

    return {"blockwise_4bit": blockwise_4bit, "rowwise_int8": rowwise_int8, "gptq": gptq, "awq": awq,
            "hqq_4bit": hqq_4bit, "round_to": round_to}


def _kernel(name: str):
    import numba

    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    return _kernels()[name]


ROUNDING = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _fp32_out(numel: int, out: Tensor | None) -> Tensor:
    """`out[:numel]` when it is a usable fp32 CPU scratch, else a new tensor."""
    return scratch_or_new(out, numel, torch.float32, torch.device("cpu"))


def _finish(result: Tensor, dtype: torch.dtype, out: Tensor | None) -> Tensor:
    """The fp32 result (already rounded to `dtype`'s values) as `out`'s dtype if fp32 was asked, else `dtype`."""
    return result if out is not None and out.dtype == torch.float32 else result.to(dtype)


def blockwise_4bit(data: Tensor, absmax: Tensor, code: Tensor, blocksize: int, numel: int, dtype: torch.dtype,
                   out: Tensor | None = None) -> Tensor:
    """NF4/FP4 codes (raw bytes) → flat weight of `numel` elements, the twin's values in `dtype`.

    With an fp32 `out` the result is fp32 (holding `dtype`'s values, so a matmul in fp32 sees what the
    twin would give after `.to(float32)`), in `dtype` otherwise.
    """
    result = _fp32_out(numel, out)
    _kernel("blockwise_4bit")(data.numpy(), absmax.float().contiguous().numpy(), _byte_pairs(code).numpy(),
                              blocksize, numel, ROUNDING[dtype], result.numpy())
    return _finish(result, dtype, out)


def rowwise_int8(codes: Tensor, row_scales: Tensor, out: Tensor | None = None) -> Tensor:
    """LLM.int8 rows: `CB · (SCB · fp32(1/127))` as (out, in) fp32, rounded as bitsandbytes' CPU training path."""
    rows, cols = codes.shape
    result = _fp32_out(rows * cols, out).view(rows, cols)
    _kernel("rowwise_int8")(codes.contiguous().numpy(), row_scales.float().contiguous().numpy(), result.numpy())
    return result


def gptq(qweight: Tensor, zeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int, in_features: int,
         out: Tensor | None = None) -> Tensor:
    """GPTQ with unpacked int32 zeros (groups, out) → (in, out), values in `scales.dtype` (see `blockwise_4bit`)."""
    out_features = qweight.shape[1]
    result = _fp32_out(in_features * out_features, out).view(in_features, out_features)
    _kernel("gptq")(qweight.contiguous().numpy(), zeros.to(torch.int32).contiguous().numpy(),
                    scales.float().contiguous().numpy(), g_idx.to(torch.int64).contiguous().numpy(), bits,
                    ROUNDING[scales.dtype], result.numpy())
    return _finish(result, scales.dtype, out)


def awq(qweight: Tensor, zeros: Tensor, scales: Tensor, group_size: int, positions: tuple[int, ...], bits: int,
        out_features: int, out: Tensor | None = None) -> Tensor:
    """AWQ GEMM layout with unpacked int32 zeros (groups, out) → (in, out), values in `scales.dtype`."""
    import numpy as np

    in_features = qweight.shape[0]
    result = _fp32_out(in_features * out_features, out).view(in_features, out_features)
    _kernel("awq")(qweight.contiguous().numpy(), zeros.to(torch.int32).contiguous().numpy(),
                   scales.float().contiguous().numpy(), group_size, np.asarray(positions, dtype=np.int64), bits,
                   ROUNDING[scales.dtype], result.numpy())
    return _finish(result, scales.dtype, out)


def hqq_4bit(packed: Tensor, zero: Tensor, scale: Tensor, rows: int, out: Tensor | None = None) -> Tensor:
    """HQQ `4bit_u8` codes with fp32 zero/scale broadcasting as (rows | 1, cols | 1) → (rows, cols) fp32."""
    cols = packed.shape[1]
    result = _fp32_out(rows * cols, out).view(rows, cols)
    _kernel("hqq_4bit")(packed.contiguous().numpy(), _as_2d(zero).numpy(), _as_2d(scale).numpy(), rows,
                        result.numpy())
    return result


_pairs_cache: dict[tuple, tuple[Tensor, Tensor]] = {}


def _byte_pairs(code: Tensor) -> Tensor:
    """(256, 2) fp32: the two code values each byte stands for (high nibble first); cached per code table."""
    key = (code.data_ptr(), code._version, code.dtype, code.numel(), code.device)
    cached = _pairs_cache.get(key)
    if cached is not None and torch.equal(cached[0], code):                # a reused address is re-checked
        return cached[1]
    values = code.float().cpu()
    byte = torch.arange(256)
    pairs = torch.stack((values[byte >> 4], values[byte & 15]), dim=1).contiguous()
    if len(_pairs_cache) > 64:                                              # code tables are few; stay small
        _pairs_cache.clear()
    _pairs_cache[key] = (code.detach().clone(), pairs)
    return pairs


def _as_2d(values: Tensor) -> Tensor:
    values = values.float()
    return (values.reshape(1, 1) if values.dim() == 0 else values.reshape(values.shape[0], -1)).contiguous()
