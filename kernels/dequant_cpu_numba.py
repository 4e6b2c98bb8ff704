"""The numba kernels behind `kernels.dequant_cpu` (imported only when numba is installed).

Module-level functions, so numba's on-disk cache (`cache=True`) finds them again in the next
process: each compiles once per (argument types) and then loads in milliseconds.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from llvmlite import binding, ir
from numba.core import cgutils, types
from numba.extending import intrinsic

_parallel = functools.partial(numba.njit, parallel=True, cache=True, nogil=True)
_inline = functools.partial(numba.njit, cache=True, inline="always")


@intrinsic
def float_bits(typingctx, value):                                       # fp32 → its uint32 bit pattern
    return types.uint32(types.float32), lambda context, builder, sig, args: builder.bitcast(
        args[0], ir.IntType(32))


@intrinsic
def bits_float(typingctx, bits):                                        # uint32 bit pattern → fp32
    return types.float32(types.uint32), lambda context, builder, sig, args: builder.bitcast(
        args[0], ir.FloatType())


@intrinsic
def fp16_bits_hw(typingctx, value):                                     # fp32 → nearest fp16's bits, by the CPU
    return types.uint16(types.float32), lambda context, builder, sig, args: builder.bitcast(
        builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))


@intrinsic
def fp16_round_hw(typingctx, value):                                    # fp32 → nearest fp16's value, as fp32
    return types.float32(types.float32), lambda context, builder, sig, args: builder.fpext(
        builder.fptrunc(args[0], ir.HalfType()), ir.FloatType())


# x86 CPUs with F16C convert fp32 → fp16 in one instruction (vcvtps2ph: IEEE, ties to even, subnormals and
# overflow to inf as torch's `.to(float16)`); elsewhere the integer rounding below. GPTQ/AWQ weights (fp16)
# in a bf16 model round twice per element: on the AMD EPYC, 11008 × 4096 GPTQ into fp16 bits, 18.8 → 8.4 ms.
F16C = bool(binding.get_host_cpu_features().get("f16c")) and numba.config.CPU_NAME in (None, "host")

# The roundings below are written without branches (selects), so the loops around them vectorize.
_U = np.uint32


@_inline
def half_bits(value, bf16):
    # The fp16 (or bf16) bit pattern nearest to the fp32 `value`, ties to even, as torch's
    # `.to(dtype)` rounds: overflow to ±inf, fp16 subnormals in steps of 2^-24.
    u = float_bits(np.float32(value))
    if bf16:
        return np.uint16((u + _U(0x7FFF) + ((u >> _U(16)) & _U(1))) >> _U(16))
    return fp16_bits_hw(np.float32(value)) if F16C else fp16_bits_soft(value)


@_inline
def fp16_bits_soft(value):
    # `half_bits` to fp16 in integer arithmetic, for CPUs without F16C.
    u = float_bits(np.float32(value))
    sign = (u >> _U(16)) & _U(0x8000)
    magnitude = u & _U(0x7FFFFFFF)
    rounded = (magnitude + _U(0xFFF) + ((magnitude >> _U(13)) & _U(1))) & _U(0xFFFFE000)
    normal = min((rounded - _U(0x38000000)) >> _U(13), _U(0x7C00))     # rebiased; past 65504: inf (0x7C00)
    tiny = min(bits_float(magnitude), np.float32(6.1035156e-05))          # below 2^-14: steps of 2^-24 …
    subnormal = _U(np.rint(tiny * np.float32(16777216.0)))                # … 0 to 1024 (= 2^-14 itself)
    return np.uint16(sign | (normal if magnitude >= _U(0x38800000) else subnormal))


@_inline
def round_in_fp32(value, bf16):
    # The fp16 (or bf16) value nearest to the fp32 `value` (as torch rounds), kept as fp32.
    u = float_bits(np.float32(value))
    if bf16:
        return bits_float((u + _U(0x7FFF) + ((u >> _U(16)) & _U(1))) & _U(0xFFFF0000))
    return fp16_round_hw(np.float32(value)) if F16C else fp16_round_soft(value)


@_inline
def fp16_round_soft(value):
    # `round_in_fp32` to fp16 in integer arithmetic, for CPUs without F16C.
    u = float_bits(np.float32(value))
    magnitude = u & _U(0x7FFFFFFF)
    rounded = (u + _U(0xFFF) + ((u >> _U(13)) & _U(1))) & _U(0xFFFFE000)
    infinite = (u & _U(0x80000000)) | _U(0x7F800000)
    normal = bits_float(infinite if (rounded & _U(0x7FFFFFFF)) > _U(0x477FE000) else rounded)
    subnormal = np.rint(np.float32(value) * np.float32(16777216.0)) * np.float32(5.9604645e-08)
    return normal if magnitude >= _U(0x38800000) else subnormal


@_inline
def put(out, k, value, mode):
    # Store element k. mode 0: fp32 as is; 1 / 2: fp32 holding the nearest fp16 / bf16 value;
    # 3 / 4: the fp16 / bf16 bit pattern into a uint16 view of a half-precision tensor; 5: the bf16 bits
    # of the nearest fp16 value (fp16 weights, such as GPTQ's and AWQ's, asked into a bf16 scratch).
    if mode == 0:
        out[k] = value
    elif mode <= 2:
        out[k] = round_in_fp32(value, mode == 2)
    elif mode <= 4:
        out[k] = half_bits(value, mode == 4)
    else:
        out[k] = half_bits(round_in_fp32(value, False), True)


@_parallel
def blockwise_4bit(packed, absmax, code, blocksize, numel, mode, out):
    # Element i = code[q_i] · absmax[i // blocksize]; byte j holds q_2j (high nibble) and q_2j+1.
    # fp32 (mode 0): one multiply per element. Rounded modes: per block the 16 values code[k] · absmax,
    # rounded and stored as `mode` asks, are made once into a small table and the block's elements
    # looked up in it: 16 roundings per block instead of one per element, the same bits (AMD EPYC,
    # 4096 × 11008, old/new per interleaved round, median of 11: fp16 3.1× (2.6–4.3), bf16 1.4×
    # (1.0–1.6); for fp32 a table was slower than the multiply). Blocks go to threads in runs of 256.
    blocks = absmax.shape[0]
    run = 256
    for first in numba.prange((blocks + run - 1) // run):
        table = np.empty(16, out.dtype)
        for block in range(first * run, min(first * run + run, blocks)):
            scale = absmax[block]
            start = block * blocksize
            end = min(start + blocksize, numel)
            if mode == 0:
                for j in range(start >> 1, end >> 1):
                    byte = packed[j]
                    out[2 * j] = code[byte >> 4] * scale
                    out[2 * j + 1] = code[byte & 15] * scale
                if end & 1:                                         # an odd last element: high nibble only
                    out[end - 1] = code[packed[end >> 1] >> 4] * scale
                continue
            for k in range(16):
                put(table, k, code[k] * scale, mode)
            for j in range(start >> 1, end >> 1):
                byte = packed[j]
                out[2 * j] = table[byte >> 4]
                out[2 * j + 1] = table[byte & 15]
            if end & 1:
                out[end - 1] = table[packed[end >> 1] >> 4]


# --- NF4/FP4 with AVX-512: a 16-entry table lookup is one permute instruction -------------------------
#
# Per block the 16 values code[k] · absmax, rounded as `mode` asks, form a table held in one vector
# register; 16 bytes of codes (32 elements) are widened so each element's nibble indexes it, and one
# `vpermw` (16-bit outputs: fp16/bf16 bits) or two `vpermps` (fp32 outputs) look all 32 up at once. The
# scalar kernel above does one lookup per element. Same tables, same bits: only the lookup changed. On
# the 2-core AMD EPYC, 11008 × 4096 NF4 into bf16, 2 threads: 22.7 ms (scalar) → 7.0 ms, bit-identical.

_I8, _I16, _I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)


def avx512_available() -> bool:
    """True when numba compiles for this CPU (its default) and the CPU has AVX-512 F and BW."""
    features = binding.get_host_cpu_features()
    host = numba.config.CPU_NAME in (None, "host") and not numba.config.CPU_FEATURES
    return host and bool(features.get("avx512f")) and bool(features.get("avx512bw"))


def _address(context, builder, array_type, array, index, vector):
    # A pointer to `vector` (an LLVM vector type) at element `index` of a contiguous array.
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [index]), vector.as_pointer())


def _call(builder, name, result, *args):
    function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(result, [a.type for a in args]), name)
    return builder.call(function, list(args))


def _table_values(context, builder, table_type, table, lanes):
    return builder.load(_address(context, builder, table_type, table, ir.Constant(ir.IntType(64), 0), lanes), align=1)


def _store(context, builder, out_type, out, at, values, stream=None):
    # `values` at element `at`. `stream` (an i1 at run time; None: never): a non-temporal store, which
    # writes the line to memory without first reading it into the caches (`vmovntps`/`vmovntdq`). Only for
    # whole 64-byte lines at 64-byte aligned addresses (a caller's promise: an unaligned one faults), and
    # the kernel ends each thread's work with `_fence`. A dequantized weight (86 MiB in bf16 for
    # 11008 × 4096) is far larger than the caches: the matmul reads it back from memory either way.
    # A Python bool decides when compiling: no branch.
    address = _address(context, builder, out_type, out, at, values.type)
    if stream is None or stream is False:
        builder.store(values, address, align=1)
    elif stream is True:
        store = builder.store(values, address, align=64)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(_I32, 1)]))
    else:
        with builder.if_else(stream) as (streamed, cached):
            with streamed:
                _store(context, builder, out_type, out, at, values, True)
            with cached:
                _store(context, builder, out_type, out, at, values, False)


@intrinsic
def _fence(typingctx):
    # `sfence`: the non-temporal stores before it are visible to every thread before any store after it
    # (the thread pool's own synchronization is not promised to order them on every CPU).
    def codegen(context, builder, sig, args):
        _call(builder, "llvm.x86.sse.sfence", ir.VoidType())
        return context.get_dummy_value()

    return types.void(), codegen


def _permute(context, builder, table_type, table, index):
    # table[index] in every lane: `vpermw` for 32 16-bit lanes (the table's 32 uint16, 16 used), `vpermps`
    # for 16 fp32 lanes (its first 16 float32).
    if index.type.element == _I16:
        values = _table_values(context, builder, table_type, table, index.type)
        return _call(builder, "llvm.x86.avx512.permvar.hi.512", index.type, values, index)
    floats = ir.VectorType(ir.FloatType(), 16)
    values = _table_values(context, builder, table_type, table, floats)
    return _call(builder, "llvm.x86.avx512.permvar.sf.512", floats, values, index)


def _store_parts(context, builder, out_type, out, at, parts, stream=None):
    # Vectors stored one after another from element `at` (`stream`: as `_store`).
    for part in parts:
        _store(context, builder, out_type, out, at, part, stream)
        at = builder.add(at, ir.Constant(at.type, part.type.count))


def _joined(builder, parts):
    # One vector of the lanes of one part, or of two of one type, in order.
    if len(parts) == 1:
        return parts[0]
    first, second = parts
    count = 2 * first.type.count
    return builder.shuffle_vector(first, second, ir.Constant(ir.VectorType(_I32, count), list(range(count))))


@_inline
def _line(out):
    # Elements of `out` in a 64-byte cache line: 16 fp32, 32 fp16/bf16 bit patterns.
    return 64 // out.itemsize


def _splat(builder, value, vector):
    # `value` (a scalar of the vector's element type) in every lane of `vector`.
    lanes = builder.insert_element(ir.Constant(vector, None), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(lanes, ir.Constant(vector, None), ir.Constant(ir.VectorType(_I32, vector.count),
                                                                                [0] * vector.count))


def _bf16_bits(builder, values):
    # The bf16 bit patterns nearest 16 fp32 lanes, ties to even, in the low half of i32 lanes: `half_bits`.
    words = ir.VectorType(_I32, 16)
    u = builder.bitcast(values, words)
    odd = builder.and_(builder.lshr(u, ir.Constant(words, [16] * 16)), ir.Constant(words, [1] * 16))
    return builder.lshr(builder.add(builder.add(u, ir.Constant(words, [0x7FFF] * 16)), odd),
                        ir.Constant(words, [16] * 16))


def _rounded(builder, value, mode, half):
    # `put`'s rounding of 16 fp32 lanes for `mode` (an i64 at run time, branch-free: every rounding is made
    # and the mode selects one): fp32 values for modes 0–2 (`half` False), bit patterns for 3–5. fp16 by
    # `fptrunc` (vcvtps2ph: callers check F16C); bf16 as `half_bits`, in integer lanes.
    floats, words, bits16 = ir.VectorType(ir.FloatType(), 16), ir.VectorType(_I32, 16), ir.VectorType(_I16, 16)
    as_half = builder.fptrunc(value, ir.VectorType(ir.HalfType(), 16))
    in_half = builder.fpext(as_half, floats)

    def mode_is(k):
        return builder.icmp_unsigned("==", mode, ir.Constant(mode.type, k))

    if half:                                                               # 3: fp16, 4: bf16, 5: fp16 then bf16
        bf16 = builder.trunc(_bf16_bits(builder, builder.select(mode_is(5), in_half, value)), bits16)
        return builder.select(mode_is(3), builder.bitcast(as_half, bits16), bf16)
    in_bf16 = builder.bitcast(builder.shl(_bf16_bits(builder, value), ir.Constant(words, [16] * 16)), floats)
    return builder.select(mode_is(1), in_half, builder.select(mode_is(2), in_bf16, value))


def _nibbles(builder, raw):
    # The 32 codes of 16 packed bytes (<16 x i8>), each byte's high nibble first: (high, low) as i32 lanes.
    words = ir.VectorType(_I32, 16)
    byte = builder.zext(raw, words)
    return builder.lshr(byte, ir.Constant(words, [4] * 16)), builder.and_(byte, ir.Constant(words, [15] * 16))


def _nibble_index(builder, high, low):
    # `vpermw` indices in code order from `_nibbles`: one 32-bit lane = (high, low) 16-bit indices.
    words = high.type
    return builder.bitcast(builder.or_(high, builder.shl(low, ir.Constant(words, [16] * 16))),
                           ir.VectorType(_I16, 32))


@intrinsic
def _lookup_32(typingctx, out, out_at, packed, packed_at, table, stream):
    # out[out_at : out_at + 32] = table[q] for the 32 codes of packed[packed_at : packed_at + 16], each
    # byte's high nibble first: `out` and `table` uint16 (vpermw over 32 entries, 16 used) or float32
    # (vpermps over 16, twice, then interleaved). `stream`: as `_store`.
    half = out.dtype == types.uint16
    sig = types.void(out, types.intp, packed, types.intp, table, types.boolean)

    def codegen(context, builder, sig, args):
        out_v, out_at_v, packed_v, packed_at_v, table_v, stream_v = args
        words = ir.VectorType(_I32, 16)
        raw = builder.load(_address(context, builder, sig.args[2], packed_v, packed_at_v, ir.VectorType(_I8, 16)),
                           align=1)
        high, low = _nibbles(builder, raw)
        if half:
            parts = [_permute(context, builder, sig.args[4], table_v, _nibble_index(builder, high, low))]
        else:
            first, second = (_permute(context, builder, sig.args[4], table_v, index) for index in (high, low))
            orders = ([i // 2 + 8 * part + (16 if i % 2 else 0) for i in range(16)] for part in range(2))
            parts = [builder.shuffle_vector(first, second, ir.Constant(words, order))   # h0 l0 h1 l1 …
                     for order in orders]
        _store_parts(context, builder, sig.args[0], out_v, out_at_v, parts, stream_v)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _lookup_nibbles_32(typingctx, out, out_at, packed, packed_at, shift, table, stream):
    # out[out_at + c] = table[(packed[packed_at + c] >> shift) & 15] for c < 32: one nibble of each of 32
    # bytes (HQQ's row-slice packing), `out`/`table`/`stream` as in `_lookup_32`.
    half = out.dtype == types.uint16
    sig = types.void(out, types.intp, packed, types.intp, types.intp, table, types.boolean)

    def codegen(context, builder, sig, args):
        out_v, out_at_v, packed_v, packed_at_v, shift_v, table_v, stream_v = args
        raw = builder.load(_address(context, builder, sig.args[2], packed_v, packed_at_v, ir.VectorType(_I8, 32)),
                           align=1)
        lane = _I16 if half else _I32
        wide = ir.VectorType(lane, 32)
        amount = _splat(builder, builder.trunc(shift_v, lane), wide)
        codes = builder.and_(builder.lshr(builder.zext(raw, wide), amount), ir.Constant(wide, [15] * 32))
        halves = [codes] if half else [builder.shuffle_vector(codes, codes, ir.Constant(
            ir.VectorType(_I32, 16), list(range(16 * part, 16 * part + 16)))) for part in range(2)]
        parts = [_permute(context, builder, sig.args[5], table_v, index) for index in halves]
        _store_parts(context, builder, sig.args[0], out_v, out_at_v, parts, stream_v)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _bf16_table(typingctx, table, code, scale):
    # table[0:16] (uint16) = the bf16 bits nearest code[k] · scale, ties to even: `half_bits`, 16 at once.
    sig = types.void(table, code, types.float32)

    def codegen(context, builder, sig, args):
        table_v, code_v, scale_v = args
        zero = ir.Constant(ir.IntType(64), 0)
        floats = ir.VectorType(ir.FloatType(), 16)
        values = builder.load(_address(context, builder, sig.args[1], code_v, zero, floats), align=1)
        bits = builder.trunc(_bf16_bits(builder, builder.fmul(values, _splat(builder, scale_v, floats))),
                             ir.VectorType(_I16, 16))
        builder.store(bits, _address(context, builder, sig.args[0], table_v, zero, ir.VectorType(_I16, 16)),
                      align=1)
        return context.get_dummy_value()

    return sig, codegen


@_parallel
def blockwise_4bit_avx512(packed, absmax, code, blocksize, blocks, mode, stream, out):
    # `blockwise_4bit` for the first `blocks` whole blocks, `blocksize` a multiple of 32: per block the
    # table (bf16 made 16 at once; other modes by `put`, as the scalar kernel), then one lookup per 32.
    # `stream` (`out` 64-byte aligned): non-temporal stores (`_store`); the AMD EPYC, 11008 × 4096 into
    # bf16: 5.4–6.3 → 4.2–4.5 ms.
    run = 256
    for first in numba.prange((blocks + run - 1) // run):
        table = np.zeros(32, out.dtype)
        for block in range(first * run, min(first * run + run, blocks)):
            scale = absmax[block]
            if mode == 4:
                _bf16_table(table, code, scale)
            else:
                for k in range(16):
                    put(table, k, code[k] * scale, mode)
            start = block * (blocksize >> 1)
            for j in range(start, start + (blocksize >> 1), 16):
                _lookup_32(out, 2 * j, packed, j, table, stream)
        if stream:
            _fence()


# --- NF4/FP4 written in-major: Wᵀ contiguous ------------------------------------------------------------
#
# oneDNN's bf16 matmul computes the input gradient g · W faster when W lies (in, out) in memory (the AMD
# EPYC, 128 × 11008 by 11008 × 4096: 32–35 ms against 37.5–46 ms from (out, in)); the forward x · Wᵀ
# prefers (out, in). `blockwise_4bit_in_major` writes the values of `blockwise_4bit_avx512` transposed.
# A tile of 32 rows × 32 columns is looked up row by row (a table per row, as the lookup kernel makes
# it); rows 2p and 2p + 1 are interleaved into two vectors of 16 (row 2p, row 2p + 1) pairs (an in-lane
# unpack, which permutes the columns in a fixed way); two 16 × 16 transposes of those 32-bit pairs give
# each column's 32 rows as one 64-byte line. 32-bit transposes of 16 vectors fit the 32 registers: a
# 16-bit 32 × 32 transpose spilled, and took 7.3–12 ms against these 5.4–7.1.


def _transposed(builder, rows):
    # The columns of n vectors of n 32-bit lanes: swap ever smaller halves of row pairs (n/2 lanes, ..., 1),
    # as a recursive block transpose does.
    count = len(rows)
    lanes = ir.VectorType(_I32, count)
    rows = list(rows)
    width = count // 2
    while width:
        low = [c * 2 * width + t + side * count for c in range(count // (2 * width)) for side in (0, 1)
               for t in range(width)]
        high = [index + width for index in low]
        for i in range(count):
            if not i & width:
                pair = rows[i], rows[i + width]
                rows[i] = builder.shuffle_vector(*pair, ir.Constant(lanes, low))
                rows[i + width] = builder.shuffle_vector(*pair, ir.Constant(lanes, high))
        width //= 2
    return rows


@intrinsic
def _in_major_tile(typingctx, out, out_at, out_stride, packed, packed_at, packed_stride, absmax, absmax_at,
                   absmax_stride, code, mode, stream):
    # Rows r < 32 and columns c < 32 (within one absmax block per row) of the 4-bit weight whose row r's
    # codes start at packed[packed_at + r · packed_stride] and whose row r scale is
    # absmax[absmax_at + r · absmax_stride], written in-major: out[out_at + c · out_stride + r] (uint16: fp16
    # bits for `mode` 3, bf16 bits for 4). `stream`: as `_store`, decided once per call.
    sig = types.void(out, types.intp, types.intp, packed, types.intp, types.intp, absmax, types.intp, types.intp,
                     code, types.intp, types.boolean)

    def codegen(context, builder, sig, args):
        (out_v, out_at_v, out_stride_v, packed_v, packed_at_v, packed_stride_v, absmax_v, absmax_at_v,
         absmax_stride_v, code_v, mode_v, stream_v) = args
        floats, words, bits16 = ir.VectorType(ir.FloatType(), 16), ir.VectorType(_I32, 16), ir.VectorType(_I16, 16)
        pairs_of = ir.VectorType(_I32, 32)
        codes = _table_values(context, builder, sig.args[9], code_v, floats)
        scales = context.make_array(sig.args[6])(context, builder, absmax_v).data
        fp16 = builder.icmp_unsigned("==", mode_v, ir.Constant(mode_v.type, 3))

        def row(r):                                                        # row r's 32 values, fp16/bf16 bits
            at = builder.add(absmax_at_v, builder.mul(absmax_stride_v, ir.Constant(absmax_stride_v.type, r)))
            values = builder.fmul(codes, _splat(builder, builder.load(builder.gep(scales, [at])), floats))
            bf16 = builder.trunc(_bf16_bits(builder, values), bits16)
            half = builder.bitcast(builder.fptrunc(values, ir.VectorType(ir.HalfType(), 16)), bits16)
            table = builder.select(fp16, half, bf16)
            table = builder.shuffle_vector(table, table, ir.Constant(pairs_of, list(range(16)) * 2))
            start = builder.add(packed_at_v, builder.mul(packed_stride_v, ir.Constant(packed_stride_v.type, r)))
            raw = builder.load(_address(context, builder, sig.args[3], packed_v, start, ir.VectorType(_I8, 16)),
                               align=1)
            index = _nibble_index(builder, *_nibbles(builder, raw))
            return _call(builder, "llvm.x86.avx512.permvar.hi.512", index.type, table, index)

        # (row 2p, row 2p + 1) pairs of columns 8L + j (j < 4; the second half: 8L + 4 + j) in 32-bit lane 4L + j
        low = [8 * lane + j + side for lane in range(4) for j in range(4) for side in (0, 32)]
        high = [index + 4 for index in low]

        def tile(streamed):
            halves = ([], [])
            for p in range(16):
                first, second = row(2 * p), row(2 * p + 1)
                for half, order in zip(halves, (low, high), strict=True):
                    half.append(builder.bitcast(builder.shuffle_vector(first, second, ir.Constant(pairs_of, order)),
                                                words))
            for half, offset in zip(halves, (0, 4), strict=True):
                for lane, column in enumerate(_transposed(builder, half)):
                    c = 8 * (lane // 4) + offset + lane % 4
                    at = builder.add(out_at_v, builder.mul(out_stride_v, ir.Constant(out_stride_v.type, c)))
                    _store(context, builder, sig.args[0], out_v, at, column, streamed)

        with builder.if_else(stream_v) as (streamed, cached):
            with streamed:
                tile(True)
            with cached:
                tile(False)
        return context.get_dummy_value()

    return sig, codegen


@_parallel
def blockwise_4bit_in_major(packed, absmax, code, blocksize, rows, cols, mode, stream, out):
    # The (rows, cols) 4-bit weight of `blockwise_4bit_avx512` as fp16/bf16 bits (`mode` 3/4), written
    # transposed: out[c · rows + r] = W[r, c]. Needs rows a multiple of 32, cols of the block size and the
    # block size of 32. Threads take 256 rows at a time, and within them 128 columns at a time: each of
    # 128 output rows then gets 512 contiguous bytes (longer runs or narrower chunks were slower on the AMD
    # EPYC: 7.1 ms here against 7.6–11 for 32–2048 rows × 32–512 columns).
    run, chunk = 256, 128
    for part in numba.prange((rows + run - 1) // run):
        for first in range(0, cols, chunk):
            for r in range(part * run, min(part * run + run, rows), 32):
                for c in range(first, min(first + chunk, cols), 32):
                    at = r * cols + c
                    _in_major_tile(out, c * rows + r, rows, packed, at >> 1, cols >> 1, absmax, at // blocksize,
                                   cols // blocksize, code, mode, stream)
        if stream:
            _fence()


@_parallel
def blockwise_8bit(codes, code, absmax, blocksize, offset, out):
    # out[i] = code[codes[i]] · absmax[i // blocksize] + offset: fp32 products and sums in the twin's order.
    shift = np.float32(offset)
    blocks = (codes.shape[0] + blocksize - 1) // blocksize
    for block in numba.prange(blocks):
        scale = absmax[block]
        for i in range(block * blocksize, min(block * blocksize + blocksize, codes.shape[0])):
            out[i] = code[codes[i]] * scale + shift


@intrinsic
def _code_16(typingctx, out, at, codes, code, scale, shift):
    # out[at : at + 16] = code[codes[at : at + 16]] · scale + shift: the 16 table entries gathered at once
    # (vgatherdps), then a product and a sum in fp32, each rounded (no fused multiply-add), as the twin.
    sig = types.void(out, types.intp, codes, code, types.float32, types.float32)

    def codegen(context, builder, sig, args):
        out_v, at_v, codes_v, code_v, scale_v, shift_v = args
        floats, ints = ir.VectorType(ir.FloatType(), 16), ir.VectorType(_I32, 16)
        raw = builder.load(_address(context, builder, sig.args[2], codes_v, at_v, ir.VectorType(_I8, 16)), align=1)
        index = builder.zext(raw, ints)
        table = builder.bitcast(context.make_array(sig.args[3])(context, builder, code_v).data, _I8.as_pointer())
        entries = _call(builder, "llvm.x86.avx512.mask.gather.dps.512", floats, ir.Constant(floats, None), table,
                        index, ir.Constant(ir.VectorType(ir.IntType(1), 16), [1] * 16), ir.Constant(_I32, 4))
        product = builder.fmul(entries, _splat(builder, scale_v, floats))
        _store(context, builder, sig.args[0], out_v, at_v, builder.fadd(product, _splat(builder, shift_v, floats)))
        return context.get_dummy_value()

    return sig, codegen


@_parallel
def blockwise_8bit_avx512(codes, code, absmax, blocksize, offset, out):
    # `blockwise_8bit` 16 elements at a time (AVX-512 gathers from the 256-entry code table); a block's
    # elements past its last multiple of 16 one at a time. The AMD EPYC, NF4 11008 × 4096's absmax
    # (704,512 codes): 0.76 → 0.23 ms, the same bits.
    shift = np.float32(offset)
    count = codes.shape[0]
    blocks = (count + blocksize - 1) // blocksize
    for block in numba.prange(blocks):
        scale = absmax[block]
        start = block * blocksize
        stop = min(start + blocksize, count)
        vector = start + (stop - start) // 16 * 16
        for i in range(start, vector, 16):
            _code_16(out, i, codes, code, scale, shift)
        for i in range(vector, stop):
            out[i] = code[codes[i]] * scale + shift


@_parallel
def rowwise_int8(codes, row_scales, mode, out):
    cols = codes.shape[1]
    for row in numba.prange(codes.shape[0]):
        factor = np.float32(row_scales[row]) * np.float32(1.0 / 127.0)    # bitsandbytes' rounding
        dst = out[row * cols:(row + 1) * cols]                             # a row slice: indices the loop's own
        for col in range(cols):
            put(dst, col, np.float32(codes[row, col]) * factor, mode)


@intrinsic
def _int8_line(typingctx, out, out_at, codes, codes_at, factor, mode, stream):
    # out.flat[out_at : … + width] = fp32(code) · factor for the int8 codes from codes.flat[codes_at], rounded
    # as `put` for `mode` (needs F16C): a 64-byte line of `out` (`_line`: 16 fp32, 32 fp16/bf16 bit patterns).
    # `stream`: as `_store`.
    half = out.dtype == types.uint16
    sig = types.void(out, types.intp, codes, types.intp, types.float32, types.intp, types.boolean)

    def codegen(context, builder, sig, args):
        out_v, out_at_v, codes_v, codes_at_v, factor_v, mode_v, stream_v = args
        floats = ir.VectorType(ir.FloatType(), 16)
        scale = _splat(builder, factor_v, floats)
        parts = []
        for k in range(2 if half else 1):                              # 16 columns each
            at = builder.add(codes_at_v, ir.Constant(codes_at_v.type, 16 * k))
            raw = builder.load(_address(context, builder, sig.args[2], codes_v, at, ir.VectorType(_I8, 16)), align=1)
            value = builder.fmul(builder.sitofp(raw, floats), scale)
            parts.append(_rounded(builder, value, mode_v, half))
        _store(context, builder, sig.args[0], out_v, out_at_v, _joined(builder, parts), stream_v)
        return context.get_dummy_value()

    return sig, codegen


@_parallel
def rowwise_int8_lines(codes, row_scales, mode, stream, out):
    # `rowwise_int8` where the CPU has F16C: a 64-byte line of a row at a time in vector code (`_int8_line`),
    # the columns past the last whole line one at a time. `stream`: as `gptq_4bit`.
    rows, cols = codes.shape
    width = _line(out)
    vector = cols // width * width
    for row in numba.prange(rows):
        factor = np.float32(row_scales[row]) * np.float32(1.0 / 127.0)    # bitsandbytes' rounding
        for col in range(0, vector, width):
            _int8_line(out, row * cols + col, codes, row * cols + col, factor, mode, stream)
        for col in range(vector, cols):
            put(out, row * cols + col, np.float32(codes[row, col]) * factor, mode)
        if stream:
            _fence()


@_parallel
def gptq(qweight, zeros, scales, g_idx, bits, in_features, mode, out):
    # out (in, out_features): (q[i, o] − z[g[i], o]) · s[g[i], o]; q packed along in (dim 0).
    per_word = 32 // bits
    mask = (1 << bits) - 1
    out_features = qweight.shape[1]
    for i in numba.prange(in_features):
        group = g_idx[i]
        word = i // per_word
        shift = (i % per_word) * bits
        dst = out[i * out_features:(i + 1) * out_features]
        for o in range(out_features):
            code = (qweight[word, o] >> shift) & mask
            put(dst, o, np.float32(code - zeros[group, o]) * scales[group, o], mode)


@intrinsic
def _gptq_8_rows(typingctx, out, out_at, out_stride, qweight, word_at, zeros, scales, group_rows, o, mode, stream):
    # 4-bit GPTQ, one 64-byte line of columns (`_line(out)`: 16 into fp32, 32 into fp16/bf16 bits):
    # out.flat[out_at + r · out_stride : … + width] = (code_r − zero) · scale, rounded as `put` for `mode`,
    # for the 8 codes r of the words at qweight.flat[word_at : … + width], zeros/scales from flat index
    # group_rows[r] + o (row r's group): each word is loaded once for its 8 rows. `stream`: as `_store`.
    half = out.dtype == types.uint16
    sig = types.void(out, types.intp, types.intp, qweight, types.intp, zeros, scales, group_rows, types.intp,
                     types.intp, types.boolean)

    def codegen(context, builder, sig, args):
        out_v, out_at_v, out_stride_v, qweight_v, word_at_v, zeros_v, scales_v, rows_v, o_v, mode_v, stream_v = args
        ints = ir.VectorType(_I32, 16)
        parts = range(2 if half else 1)                                # 16 columns each
        words = [builder.load(_address(context, builder, sig.args[3], qweight_v,
                                       builder.add(word_at_v, ir.Constant(word_at_v.type, 16 * k)), ints), align=1)
                 for k in parts]
        rows = context.make_array(sig.args[7])(context, builder, rows_v).data
        for r in range(8):
            at = builder.add(builder.load(builder.gep(rows, [ir.Constant(ir.IntType(64), r)])), o_v)
            values = []
            for k in parts:
                zero, scale = _zero_scale(context, builder, sig.args[5], zeros_v, sig.args[6], scales_v,
                                          builder.add(at, ir.Constant(at.type, 16 * k)))
                codes = builder.and_(builder.lshr(words[k], ir.Constant(ints, [4 * r] * 16)),
                                     ir.Constant(ints, [15] * 16))
                values.append(_rounded(builder, _affine(builder, codes, zero, scale), mode_v, half))
            row_at = builder.add(out_at_v, builder.mul(out_stride_v, ir.Constant(out_stride_v.type, r)))
            _store(context, builder, sig.args[0], out_v, row_at, _joined(builder, values), stream_v)
        return context.get_dummy_value()

    return sig, codegen


@_parallel
def gptq_4bit(qweight, zeros, scales, g_idx, in_features, mode, stream, out):
    # `gptq` at 4 bits, where the CPU has F16C: a 64-byte line of columns × the 8 rows of a word row at a
    # time in vector code (`_gptq_8_rows`); the columns past the last whole line, and a partly used last
    # word row, as `gptq`. `stream`: non-temporal stores (`_store`; `out` 64-byte aligned, its rows whole
    # lines). The AMD EPYC, 11008 × 4096 into bf16 bits from fp16 scales (mode 5): 9.3–9.7 → 5.7–6.0 ms.
    out_features = qweight.shape[1]
    width = _line(out)
    vector = out_features // width * width
    full = in_features // 8
    for w in numba.prange(qweight.shape[0]):
        rows = np.empty(8, np.int64)
        for r in range(8):
            rows[r] = g_idx[min(8 * w + r, in_features - 1)] * out_features
        whole = w < full                                                # all 8 rows exist: vectors, then the rest
        if whole:
            for o in range(0, vector, width):
                _gptq_8_rows(out, 8 * w * out_features + o, out_features, qweight, w * out_features + o, zeros,
                             scales, rows, o, mode, stream)
        for r in range(min(8, in_features - 8 * w)):
            i = 8 * w + r
            group = g_idx[i]
            for o in range(vector if whole else 0, out_features):
                code = (qweight[w, o] >> (4 * r)) & 15
                put(out, i * out_features + o, np.float32(code - zeros[group, o]) * scales[group, o], mode)
        if stream:
            _fence()


@_inline
def _awq_row(qweight, zeros, scales, i, group, positions, bits, out_features, dst):
    # Row i of the (in, out) weight as fp32 into dst: (q[i, o] − z[group, o]) · s[group, o].
    per_word = 32 // bits
    mask = (1 << bits) - 1
    full_words = out_features // per_word
    if per_word == 8:                                                   # 4-bit: a fixed trip count unrolls
        for w in range(full_words):
            word = qweight[i, w]
            for j in range(8):
                o = w * 8 + j
                dst[o] = np.float32(((word >> (positions[j] * 4)) & 15) - zeros[group, o]) * scales[group, o]
    else:
        for w in range(full_words):
            word = qweight[i, w]
            for j in range(per_word):
                o = w * per_word + j
                code = (word >> (positions[j] * bits)) & mask
                dst[o] = np.float32(code - zeros[group, o]) * scales[group, o]
    for o in range(full_words * per_word, out_features):                # a partly used last word
        code = (qweight[i, full_words] >> (positions[o % per_word] * bits)) & mask
        dst[o] = np.float32(code - zeros[group, o]) * scales[group, o]


def _awq_codes(context, builder, qweight_t, qweight_v, word_v, shifts_t, shifts_v):
    # The 16 4-bit codes (as i32) of the two words at flat index `word_v` of qweight: each word broadcast
    # to 8 lanes and shifted by `shifts` (AWQ's nibble order).
    ints = ir.VectorType(_I32, 16)
    pair = builder.load(_address(context, builder, qweight_t, qweight_v, word_v, ir.VectorType(_I32, 2)), align=1)
    words = builder.shuffle_vector(pair, pair, ir.Constant(ints, [0] * 8 + [1] * 8))
    shift = _table_values(context, builder, shifts_t, shifts_v, ints)
    return builder.and_(builder.lshr(words, shift), ir.Constant(ints, [15] * 16))


def _zero_scale(context, builder, zeros_t, zeros_v, scales_t, scales_v, at_v):
    # 16 zeros (i32) and scales (fp32) from flat index `at_v`.
    ints, floats = ir.VectorType(_I32, 16), ir.VectorType(ir.FloatType(), 16)
    return (builder.load(_address(context, builder, zeros_t, zeros_v, at_v, ints), align=1),
            builder.load(_address(context, builder, scales_t, scales_v, at_v, floats), align=1))


def _affine(builder, codes, zero, scale):
    # (codes − zero) · scale in fp32, 16 lanes.
    return builder.fmul(builder.sitofp(builder.sub(codes, zero), ir.VectorType(ir.FloatType(), 16)), scale)


@intrinsic
def _awq_16(typingctx, row, o, qweight, word_at, zeros, scales, at, shifts):
    # row[o : o + 16] = (code − zero) · scale in fp32 for the 16 codes of the two words at flat index `word_at`
    # of qweight (`_awq_codes`), zeros/scales from flat index `at`: plain LLVM vector code, no instruction set
    # assumed.
    sig = types.void(row, types.intp, qweight, types.intp, zeros, scales, types.intp, shifts)

    def codegen(context, builder, sig, args):
        row_v, o_v, qweight_v, word_v, zeros_v, scales_v, at_v, shifts_v = args
        codes = _awq_codes(context, builder, sig.args[2], qweight_v, word_v, sig.args[7], shifts_v)
        zero, scale = _zero_scale(context, builder, sig.args[4], zeros_v, sig.args[5], scales_v, at_v)
        _store(context, builder, sig.args[0], row_v, o_v, _affine(builder, codes, zero, scale))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _awq_rows_rounded(typingctx, out, out_at, out_stride, rows, qweight, word_at, words, zeros, scales, at, shifts,
                      mode, stream):
    # `_awq_16` for a 64-byte line of columns (`_line(out)`: 16 into fp32, 32 into fp16/bf16 bits) of `rows`
    # (a constant: 1 or 4) consecutive rows of one group, rounded and stored as `put` stores for `mode`
    # (needs F16C) at out.flat[out_at + r · out_stride : … + width]: the group's zeros and scales are loaded
    # once for all of them, each row's words from word_at + r · words. `stream`: as `_store`.
    if not isinstance(rows, types.IntegerLiteral):
        return None
    count = rows.literal_value
    half = out.dtype == types.uint16
    sig = types.void(out, types.intp, types.intp, rows, qweight, types.intp, types.intp, zeros, scales, types.intp,
                     shifts, types.intp, types.boolean)

    def codegen(context, builder, sig, args):
        (out_v, out_at_v, out_stride_v, _, qweight_v, word_v, words_v, zeros_v, scales_v, at_v, shifts_v, mode_v,
         stream_v) = args
        parts = range(2 if half else 1)                                # 16 columns (2 words) each
        groups = [_zero_scale(context, builder, sig.args[7], zeros_v, sig.args[8], scales_v,
                              builder.add(at_v, ir.Constant(at_v.type, 16 * k))) for k in parts]
        for r in range(count):
            step = ir.Constant(words_v.type, r)
            values = []
            for k in parts:
                word = builder.add(builder.add(word_v, builder.mul(words_v, step)), ir.Constant(word_v.type, 2 * k))
                codes = _awq_codes(context, builder, sig.args[4], qweight_v, word, sig.args[10], shifts_v)
                values.append(_rounded(builder, _affine(builder, codes, *groups[k]), mode_v, half))
            _store(context, builder, sig.args[0], out_v, builder.add(out_at_v, builder.mul(out_stride_v, step)),
                   _joined(builder, values), stream_v)
        return context.get_dummy_value()

    return sig, codegen


@_parallel
def awq(qweight, zeros, scales, group_size, positions, bits, out_features, mode, out):
    # out (in, out_features): (q[i, o] − z[i // g, o]) · s[i // g, o]; q packed along out (dim 1).
    # The word loop's scattered stores vectorize only without the rounding in them: a row is made in
    # fp32 first, then rounded (or turned into half-precision bits) in a second, contiguous pass.
    # 4-bit rows are made 16 columns at a time by `_awq_16` (the AMD EPYC, 11008 × 4096 into bf16 bits
    # from fp16 scales: 22.7 → 9.8 ms), the columns past the last multiple of 16 as before. With F16C,
    # 4-bit goes to `awq_4bit` instead.
    vector = (out_features // 16) * 16 if bits == 4 else 0
    shifts = _awq_shifts(positions)
    words = qweight.shape[1]
    for i in numba.prange(qweight.shape[0]):
        dst = out[i * out_features:(i + 1) * out_features]
        group = i // group_size
        row = np.empty(out_features, np.float32)
        if vector:
            for o in range(0, vector, 16):
                _awq_16(row, o, qweight, i * words + (o >> 3), zeros, scales, group * out_features + o, shifts)
            for o in range(vector, out_features):
                code = (qweight[i, o >> 3] >> shifts[o % 8]) & 15
                row[o] = np.float32(code - zeros[group, o]) * scales[group, o]
        else:
            _awq_row(qweight, zeros, scales, i, group, positions, bits, out_features, row)
        for o in range(out_features):
            put(dst, o, row[o], mode)


@_inline
def _awq_shifts(positions):
    # The 16 lanes' shifts of `_awq_codes`: lane j takes nibble positions[j mod 8] of its word.
    shifts = np.empty(16, np.int32)
    for j in range(16):
        shifts[j] = positions[j % 8] * 4
    return shifts


@_parallel
def awq_4bit(qweight, zeros, scales, group_size, positions, out_features, mode, stream, out):
    # `awq` at 4 bits where the CPU has F16C: a 64-byte line of columns of 4 rows of a group at a time in
    # vector code, rounded and stored in the same pass (`_awq_rows_rounded`: the group's zeros and scales
    # loaded once for the 4 rows). Rows in blocks of 4; a block that crosses a group or the end goes a row
    # at a time, the columns past the last whole line one element at a time. `stream`: as `gptq_4bit`.
    # The AMD EPYC, 11008 × 4096 into bf16 bits from fp16 scales: 9.2–10.3 → 5.8 ms (bit-identical).
    width = _line(out)
    vector = out_features // width * width
    shifts = _awq_shifts(positions)
    rows, words = qweight.shape[0], qweight.shape[1]
    for block in numba.prange((rows + 3) // 4):
        first = 4 * block
        last = min(first + 4, rows)
        if last - first == 4 and first // group_size == (last - 1) // group_size:
            group = first // group_size
            for o in range(0, vector, width):
                _awq_rows_rounded(out, first * out_features + o, out_features, 4, qweight, first * words + (o >> 3),
                                  words, zeros, scales, group * out_features + o, shifts, mode, stream)
        else:
            for i in range(first, last):
                for o in range(0, vector, width):
                    _awq_rows_rounded(out, i * out_features + o, out_features, 1, qweight, i * words + (o >> 3),
                                      words, zeros, scales, (i // group_size) * out_features + o, shifts, mode, stream)
        for i in range(first, last):
            group = i // group_size
            for o in range(vector, out_features):
                code = (qweight[i, o >> 3] >> shifts[o % 8]) & 15
                put(out, i * out_features + o, np.float32(code - zeros[group, o]) * scales[group, o], mode)
        if stream:
            _fence()


@_inline
def _hqq_row(packed, zero, scale, r, mode, rounds, bf16, dst):
    # Row r of the code matrix into dst. `rounds` and `bf16` are constants at each call site, so
    # the rounding of (code − zero) compiles to straight-line code (a runtime test there would keep
    # the loop from vectorizing).
    half = packed.shape[0]
    source = r % half
    shift = 4 if r < half else 0
    zero_row = r * (1 if zero.shape[0] > 1 else 0)                          # broadcast: one row, or one per row
    scale_row = r * (1 if scale.shape[0] > 1 else 0)                        # (r may be unsigned: no `r if … else 0`)
    if zero.shape[1] == 1 and scale.shape[1] == 1:                      # axis 1: one zero/scale per row
        z = zero[zero_row, 0]
        s = scale[scale_row, 0]
        for c in range(packed.shape[1]):
            shifted = np.float32((packed[source, c] >> shift) & 15) - z
            put(dst, c, (round_in_fp32(shifted, bf16) if rounds else shifted) * s, mode)
    else:
        zero_cols = 1 if zero.shape[1] > 1 else 0                         # broadcast strides: 1, or 0
        scale_cols = 1 if scale.shape[1] > 1 else 0
        for c in range(packed.shape[1]):
            shifted = np.float32((packed[source, c] >> shift) & 15) - zero[zero_row, c * zero_cols]
            put(dst, c, (round_in_fp32(shifted, bf16) if rounds else shifted) * scale[scale_row, c * scale_cols], mode)


@_parallel
def hqq_4bit(packed, zero, scale, rows, mode, out):
    # Code row r is the high nibble of packed row r (r < half) or the low nibble of row r − half.
    # In a half-precision compute dtype hqq rounds twice, (code − zero) and then · scale: so do we.
    cols = packed.shape[1]
    for r in numba.prange(rows):
        dst = out[r * cols:(r + 1) * cols]
        if mode == 0:
            _hqq_row(packed, zero, scale, r, mode, False, False, dst)
        elif mode == 2 or mode == 4:
            _hqq_row(packed, zero, scale, r, mode, True, True, dst)
        else:
            _hqq_row(packed, zero, scale, r, mode, True, False, dst)


@_parallel
def hqq_4bit_avx512(packed, zero, scale, rows, mode, stream, out):
    # `hqq_4bit` for one zero and scale per code row (axis 1) and a multiple of 32 columns: per row the 16
    # values (k − zero) · scale, rounded as hqq rounds them, in a table; then one lookup per 32 codes.
    # Rows go to threads in runs of 256, one table each; the table loop is written once per mode, so
    # each compiles without a branch on the mode and vectorizes (16 lanes: one instruction per step).
    # `stream`: as `blockwise_4bit_avx512` (the AMD EPYC, 11008 × 4096 into bf16: 5.1–5.6 → 3.8–4.0 ms).
    half, cols = packed.shape[0], packed.shape[1]
    run = 256
    for first in numba.prange((rows + run - 1) // run):
        table = np.zeros(32, out.dtype)
        for r in range(first * run, min(first * run + run, rows)):
            z = zero[r * (1 if zero.shape[0] > 1 else 0), 0]
            s = scale[r * (1 if scale.shape[0] > 1 else 0), 0]
            if mode == 0:
                for k in range(16):
                    table[k] = (np.float32(k) - z) * s
            elif mode == 4:
                for k in range(16):
                    table[k] = half_bits(round_in_fp32(np.float32(k) - z, True) * s, True)
            elif mode == 2:
                for k in range(16):
                    table[k] = round_in_fp32(round_in_fp32(np.float32(k) - z, True) * s, True)
            else:
                for k in range(16):
                    put(table, k, round_in_fp32(np.float32(k) - z, False) * s, mode)
            source = r % half
            shift = 4 if r < half else 0
            for c in range(0, cols, 32):
                _lookup_nibbles_32(out, r * cols + c, packed, source * cols + c, shift, table, stream)
        if stream:
            _fence()


@numba.njit(cache=True)
def convert(values, mode, out):
    # `put` over an array: for the rounding tests.
    for k in range(values.shape[0]):
        put(out, k, values[k], mode)


@numba.njit(cache=True)
def convert_fp16_soft(values, bits, rounded):
    # The integer fp16 roundings over an array, whichever the CPU uses: for the rounding tests.
    for k in range(values.shape[0]):
        bits[k] = fp16_bits_soft(values[k])
        rounded[k] = fp16_round_soft(values[k])
