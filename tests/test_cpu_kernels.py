"""The numba CPU kernels give their torch twins' results bit for bit, in every dtype and layout."""

from __future__ import annotations

import functools
import time

import pytest
import torch

from qlora_inject.kernels import autotune, dequant_cpu
from qlora_inject.kernels.dequant_4bit import dequantize_4bit, dequantize_4bit_torch
from qlora_inject.kernels.dequant_gptq import (
    dequantize_awq_gemm,
    dequantize_awq_gemm_torch,
    dequantize_gptq,
    dequantize_gptq_torch,
)
from qlora_inject.kernels.dequant_hqq import dequantize_hqq, dequantize_hqq_torch
from qlora_inject.kernels.dequant_int8 import dequantize_int8_rowwise, dequantize_int8_rowwise_torch
from qlora_inject.kernels.workspace import scratch

pytestmark = pytest.mark.skipif(not dequant_cpu.available(), reason="numba is not installed")


@pytest.fixture(autouse=True)
def _numba_path(monkeypatch):
    """The kernels under test run whatever path the measurement would keep for these small shapes."""
    monkeypatch.setenv("QLORA_INJECT_KERNEL", "numba")
    autotune.reset()
    yield
    autotune.reset()

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _same(kernel: torch.Tensor, twin: torch.Tensor) -> None:
    assert kernel.shape == twin.shape
    assert torch.equal(kernel.to(twin.dtype), twin) and torch.equal(kernel.float(), twin.float())


def _same_in_bf16_scratch(dequantize, twin: torch.Tensor) -> None:
    """fp16 weights (GPTQ's and AWQ's scales) asked into a bf16 model's scratch are written there as the
    twin's `.to(bfloat16)`, with no fp16 tensor between."""
    buffer = scratch(twin.numel(), torch.bfloat16, "cpu")
    written = dequantize(out=buffer)
    if twin.dtype == torch.float16:
        assert written.dtype == torch.bfloat16 and written.untyped_storage().data_ptr() == buffer.data_ptr()
    _same(written.to(torch.bfloat16), twin.to(torch.bfloat16))


def _words(*shape: int) -> torch.Tensor:
    return torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32)


def _lines(numel: int, out_type):
    """A zeroed numpy array of `out_type` (float32 or uint16) starting on a 64-byte line (torch's CPU
    allocations are), as the non-temporal stores need."""
    import numpy as np

    memory = torch.zeros(numel, dtype=torch.float32 if out_type == np.float32 else torch.int16)
    assert memory.data_ptr() % 64 == 0
    return np.from_dlpack(memory).view(out_type)


def test_rounding_to_fp16_and_bf16_equals_torch_casts_including_ties_subnormals_and_overflow():
    convert = dequant_cpu._kernels()["convert"]
    values = torch.cat([
        torch.randn(5000) * 10.0 ** torch.randint(-9, 6, (5000,)).float(),
        torch.tensor([65504.0, 65519.0, 65520.0, 70000.0, -65520.0, 2.0**-24, 2.0**-25, 3 * 2.0**-25, 2.0**-14,
                      2.0**-14 - 2.0**-25, -(2.0**-24), 1e-30, 1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-8,
                      1 + 3 * 2.0**-8, 3e38, 0.0, -0.0]),
        torch.randint(-2**31, 2**31 - 1, (5000,), dtype=torch.int32).view(torch.float32),   # every exponent
    ])
    values = values[values.isfinite()]
    soft_bits, soft_rounded = torch.empty_like(values, dtype=torch.float16), torch.empty_like(values)
    dequant_cpu._kernels()["convert_fp16_soft"](values.numpy(), soft_bits.view(torch.int16).numpy().view("uint16"),
                                                soft_rounded.numpy())  # the integer path, F16C or not
    assert torch.equal(soft_bits.view(torch.int16), values.to(torch.float16).view(torch.int16))
    assert torch.equal(soft_rounded, values.to(torch.float16).float())
    twice = torch.empty_like(values, dtype=torch.bfloat16)
    convert(values.numpy(), 5, twice.view(torch.int16).numpy().view("uint16"))   # fp16's value, then bf16's
    assert torch.equal(twice.view(torch.int16), values.to(torch.float16).to(torch.bfloat16).view(torch.int16))
    for dtype, in_fp32, bits in ((torch.float16, 1, 3), (torch.bfloat16, 2, 4)):
        expected = values.to(dtype)
        rounded = torch.empty_like(values)
        convert(values.numpy(), in_fp32, rounded.numpy())                      # fp32 holding the dtype's value
        assert torch.equal(rounded.view(torch.int32), expected.float().view(torch.int32)), dtype   # -0.0 too
        patterns = torch.empty_like(values, dtype=dtype)
        convert(values.numpy(), bits, patterns.view(torch.int16).numpy().view("uint16"))
        assert torch.equal(patterns.view(torch.int16), expected.view(torch.int16)), dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 128), (40, 96), (7, 201)])
def test_4bit_kernel_equals_the_twin(shape, dtype):
    torch.manual_seed(0)
    numel = shape[0] * shape[1]
    packed = torch.randint(0, 256, ((numel + 1) // 2,), dtype=torch.uint8)
    absmax = torch.rand(-(-numel // 64)) * 3
    code = torch.linspace(-1, 1, 16)
    twin = dequantize_4bit_torch(packed, absmax, code, 64, shape, dtype)
    _same(dequantize_4bit(packed, absmax, code, 64, shape, dtype), twin)
    into = dequantize_4bit(packed, absmax, code, 64, shape, dtype, out=scratch(numel, torch.float32, "cpu"))
    assert into.dtype == torch.float32                                      # fp32 container, the dtype's values
    _same(into, twin)
    buffer = scratch(numel, dtype, "cpu")
    written = dequantize_4bit(packed, absmax, code, 64, shape, dtype, out=buffer)
    assert written.dtype == dtype and written.data_ptr() == buffer.data_ptr()   # straight into the dtype's scratch
    _same(written, twin)
    if dtype == torch.float32:                                             # fp32 values into a half scratch
        for half in (torch.float16, torch.bfloat16):
            buffer = scratch(numel, half, "cpu")
            written = dequantize_4bit(packed, absmax, code, 64, shape, dtype, out=buffer)
            assert written.dtype == half and written.data_ptr() == buffer.data_ptr()
            _same(written, twin.to(half))


@pytest.mark.skipif(not dequant_cpu.avx512(), reason="the AVX-512 lookup needs AVX-512 F and BW")
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256])
@pytest.mark.parametrize("mode", range(5))
def test_the_avx512_4bit_lookup_gives_the_scalar_kernels_bits_in_every_mode(blocksize, mode):
    """The permute-based kernel (32 codes per instruction) against the one-lookup-per-element kernel, on
    scales that round to ties, overflow fp16 and fall to its subnormals, with a partial last block."""
    import numpy as np

    from qlora_inject.kernels import dequant_cpu_numba as kernels

    torch.manual_seed(0)
    numel = blocksize * 37 + 21                                             # 37 whole blocks and a partial one
    packed = torch.randint(0, 256, ((numel + 1) // 2,), dtype=torch.uint8).numpy()
    absmax = (torch.rand(-(-numel // blocksize)) * 3).numpy()
    absmax[::5] = np.float32(7e4)                                           # past fp16's largest value
    absmax[1::5] = np.float32(3e-6)                                         # into fp16's subnormals
    absmax[2::5] = np.float32(1 + 2 ** -8)                                  # bf16 ties
    code = torch.linspace(-1, 1, 16).numpy()
    out_type = np.float32 if mode <= 2 else np.uint16
    expected = np.zeros(numel, out_type)
    kernels.blockwise_4bit(packed, absmax, code, blocksize, numel, mode, expected)
    whole = numel // blocksize
    for stream in (False, True):                                            # plain and non-temporal stores
        got = _lines(numel, out_type)
        kernels.blockwise_4bit_avx512(packed, absmax, code, blocksize, whole, mode, stream, got)
        assert got[whole * blocksize:].max() == 0, "wrote past its whole blocks"
        assert np.array_equal(got[:whole * blocksize].view(np.uint32 if mode <= 2 else np.uint16),
                              expected[:whole * blocksize].view(np.uint32 if mode <= 2 else np.uint16))


@pytest.mark.skipif(not dequant_cpu.avx512(), reason="the in-major kernel looks codes up with AVX-512")
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256])
@pytest.mark.parametrize("mode", [3, 4])
def test_the_in_major_4bit_kernel_writes_the_lookup_kernels_values_transposed(blocksize, mode):
    """(rows, cols) written as (cols, rows): every value the out-major kernel gives, in its transposed place,
    on scales that round to ties, overflow fp16 and fall to its subnormals; a partial column chunk (160)."""
    import numpy as np

    from qlora_inject.kernels import dequant_cpu_numba as kernels

    torch.manual_seed(blocksize)
    rows, cols = 96, max(160, blocksize)
    cols -= cols % blocksize
    packed = torch.randint(0, 256, (rows * cols // 2,), dtype=torch.uint8).numpy()
    absmax = (torch.rand(rows * cols // blocksize) * 3).numpy()
    absmax[::5] = np.float32(7e4)
    absmax[1::5] = np.float32(3e-6)
    absmax[2::5] = np.float32(1 + 2 ** -8)
    code = torch.linspace(-1, 1, 16).numpy()
    expected = _lines(rows * cols, np.uint16)
    kernels.blockwise_4bit_avx512(packed, absmax, code, blocksize, absmax.shape[0], mode, False, expected)
    for stream in (False, True):
        got = _lines(rows * cols, np.uint16)
        kernels.blockwise_4bit_in_major(packed, absmax, code, blocksize, rows, cols, mode, stream, got)
        assert np.array_equal(got.reshape(cols, rows), expected.reshape(rows, cols).T)


def test_the_4bit_dispatch_writes_w_in_major_when_asked_and_able():
    from qlora_inject.kernels import dequant_matmul_tiled

    torch.manual_seed(0)
    rows, cols = 64, 128
    packed = torch.randint(0, 256, (rows * cols // 2,), dtype=torch.uint8)
    absmax, code = torch.rand(rows * cols // 64) * 2, torch.linspace(-1, 1, 16)
    for dtype in DTYPES:
        twin = dequantize_4bit_torch(packed, absmax, code, 64, (rows, cols), dtype)
        with dequant_matmul_tiled.in_major() as request:
            got = dequantize_4bit(packed, absmax, code, 64, (rows, cols), dtype, out=scratch(rows * cols, dtype, "cpu"))
        _same(got, twin)
        able = dtype != torch.float32 and dequant_cpu.avx512()
        assert request.honoured == able and got.t().is_contiguous() == able, dtype


@pytest.mark.skipif(not dequant_cpu.avx512(), reason="the AVX-512 lookup needs AVX-512 F and BW")
@pytest.mark.parametrize("mode", range(6))
@pytest.mark.parametrize("rows, cols, per_row", [(63, 64, True), (40, 96, True), (40, 64, False)])
def test_the_avx512_hqq_lookup_gives_the_scalar_kernels_bits_in_every_mode(mode, rows, cols, per_row):
    import numpy as np

    from qlora_inject.kernels import dequant_cpu_numba as kernels

    torch.manual_seed(mode)
    packed = torch.randint(0, 256, ((rows + 1) // 2, cols), dtype=torch.uint8).numpy()
    count = rows if per_row else 1
    zero = (torch.rand(count, 1) * 15).numpy()
    scale = (torch.rand(count, 1) * 0.02).numpy()
    scale[::3] = np.float32(3e4)                                            # products past fp16's range
    out_type = np.float32 if mode <= 2 else np.uint16
    expected = np.zeros(rows * cols, out_type)
    kernels.hqq_4bit(packed, zero, scale, rows, mode, expected)
    bits = np.uint32 if mode <= 2 else np.uint16
    for stream in (False, True):
        got = _lines(rows * cols, out_type)
        kernels.hqq_4bit_avx512(packed, zero, scale, rows, mode, stream, got)
        assert np.array_equal(got.view(bits), expected.view(bits))


@pytest.mark.skipif(not dequant_cpu.f16c(), reason="the vector GPTQ/AWQ kernels round with F16C")
@pytest.mark.parametrize("mode", range(6))
@pytest.mark.parametrize("out_features, stream", [(40, False), (64, True)])
def test_the_vector_gptq_and_awq_kernels_give_the_scalar_kernels_bits_in_every_mode(mode, out_features, stream):
    """A line of columns and several rows at a time against one element at a time, on scales that overflow
    fp16, fall to its subnormals and round to ties, with a partial last word row, act-order groups, groups
    that split a block of 4 AWQ rows, and columns past the last whole line (40); rows of whole lines (64)
    with non-temporal stores."""
    import numpy as np

    from qlora_inject.kernels import dequant_cpu_numba as kernels

    torch.manual_seed(mode)
    in_features = 98
    zeros = torch.randint(0, 16, (in_features, out_features), dtype=torch.int32).numpy()
    scales = (torch.rand(in_features, out_features) * 0.1).numpy()
    scales[::3] = np.float32(3e3)                                           # products past fp16's range
    scales[1::3] = np.float32(1e-6)                                         # into fp16's subnormals
    scales[:, ::5] = np.float32(1 + 2 ** -9)                                # ties
    out_type = np.float32 if mode <= 2 else np.uint16
    bits = np.uint32 if mode <= 2 else np.uint16
    qweight = _words(-(-in_features // 8), out_features).numpy()
    for g_idx in (torch.arange(in_features) // 7, torch.randperm(in_features) % 14):
        g_idx = g_idx.numpy()
        expected, got = np.zeros(in_features * out_features, out_type), _lines(in_features * out_features, out_type)
        kernels.gptq(qweight, zeros, scales, g_idx, 4, in_features, mode, expected)
        kernels.gptq_4bit(qweight, zeros, scales, g_idx, in_features, mode, stream, got)
        assert np.array_equal(got.view(bits), expected.view(bits)), "gptq"
    positions = np.array([0, 4, 1, 5, 2, 6, 3, 7], dtype=np.int64)
    qweight = _words(in_features, out_features // 8).numpy()
    for group_size in (6, 32):
        expected, got = np.zeros(in_features * out_features, out_type), _lines(in_features * out_features, out_type)
        kernels.awq(qweight, zeros, scales, group_size, positions, 4, out_features, mode, expected)
        kernels.awq_4bit(qweight, zeros, scales, group_size, positions, out_features, mode, stream, got)
        assert np.array_equal(got.view(bits), expected.view(bits)), "awq"


def test_the_double_quantized_absmax_decode_gives_the_twins_bits():
    from qlora_inject.kernels.dequant_4bit import dequantize_blockwise_8bit, dequantize_blockwise_8bit_torch

    torch.manual_seed(0)
    for count, blocksize in ((256 * 5, 256), (256 * 5 + 77, 256), (100, 64)):
        codes = torch.randint(0, 256, (count,), dtype=torch.uint8)
        code, scales = torch.randn(256), torch.rand(-(-count // blocksize)) * 2
        offset = torch.tensor(0.0371)
        twin = dequantize_blockwise_8bit_torch(codes, code, scales, blocksize, offset)
        assert torch.equal(dequant_cpu.blockwise_8bit(codes, code, scales, blocksize, offset), twin)
        assert torch.equal(dequantize_blockwise_8bit(codes, code, scales, blocksize, offset), twin)
        if dequant_cpu.avx512():                                            # the gathers against the scalar loop
            from qlora_inject.kernels import dequant_cpu_numba as kernels

            arrays = (codes.numpy(), code.numpy(), scales.numpy(), blocksize, float(offset))
            scalar, gathered = torch.zeros(count), torch.zeros(count)
            kernels.blockwise_8bit(*arrays, scalar.numpy())
            kernels.blockwise_8bit_avx512(*arrays, gathered.numpy())
            assert torch.equal(gathered, scalar) and torch.equal(gathered, twin)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("zero_offset", [0, 1])
def test_gptq_kernel_equals_the_twin(bits, act_order, zero_offset):
    torch.manual_seed(bits)
    in_features, out_features, group_size = 96, 40, 32
    per_word = 32 // bits
    qweight = _words(in_features // per_word, out_features)
    qzeros = _words(in_features // group_size, -(-out_features // per_word))
    g_idx = torch.arange(in_features) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(in_features)]
    for dtype in DTYPES:
        scales = (torch.rand(in_features // group_size, out_features) * 0.1).to(dtype)
        args = (qweight, qzeros, scales, g_idx, bits, in_features, out_features, zero_offset)
        twin = dequantize_gptq_torch(*args)
        _same(dequantize_gptq(*args), twin)
        for buffer_dtype in {torch.float32, dtype}:
            _same(dequantize_gptq(*args, out=scratch(in_features * out_features, buffer_dtype, "cpu")), twin)
        _same_in_bf16_scratch(functools.partial(dequantize_gptq, *args), twin)


@pytest.mark.parametrize("bits, interleaved", [(4, True), (4, False), (2, False), (8, False)])
@pytest.mark.parametrize("out_features", [64, 60])
def test_awq_kernel_equals_the_twin(bits, interleaved, out_features):
    torch.manual_seed(bits)
    in_features, group_size = 96, 32
    words = -(-out_features // (32 // bits))
    qweight, qzeros = _words(in_features, words), _words(-(-in_features // group_size), words)
    for dtype in DTYPES:
        scales = (torch.rand(-(-in_features // group_size), out_features) * 0.1).to(dtype)
        args = (qweight, qzeros, scales, bits, group_size, out_features, interleaved)
        twin = dequantize_awq_gemm_torch(*args)
        _same(dequantize_awq_gemm(*args), twin)
        for buffer_dtype in {torch.float32, dtype}:
            _same(dequantize_awq_gemm(*args, out=scratch(in_features * out_features, buffer_dtype, "cpu")), twin)
        _same_in_bf16_scratch(functools.partial(dequantize_awq_gemm, *args), twin)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("rows", [64, 63])
@pytest.mark.parametrize("dtype", DTYPES)
def test_hqq_4bit_kernel_equals_the_twin(axis, rows, dtype):
    torch.manual_seed(axis)
    cols = 32
    packed = torch.randint(0, 256, ((rows + 1) // 2, cols), dtype=torch.uint8)
    broadcast = (rows, 1) if axis == 1 else (1, cols)
    meta = {"packing": "4bit_u8", "axis": axis, "group_size": cols if axis == 1 else rows,
            "shape": (rows * cols // 16, 16), "compute_dtype": dtype,
            "zero": (torch.rand(broadcast) * 15).to(dtype), "scale": torch.rand(broadcast).to(dtype)}
    twin = dequantize_hqq_torch(packed, meta)
    assert twin.dtype == dtype
    _same(dequantize_hqq(packed, meta), twin)
    for buffer_dtype in {torch.float32, dtype}:
        _same(dequantize_hqq(packed, meta, out=scratch(rows * cols, buffer_dtype, "cpu")), twin)


def test_an_out_buffer_off_a_cache_line_gets_plain_stores_and_the_same_bits():
    """The vector kernels write whole aligned lines with non-temporal stores, which fault on an unaligned
    address: an `out` that starts one element into a buffer must be written with plain stores."""
    torch.manual_seed(0)
    rows, cols = 64, 64
    shifted = torch.empty(rows * cols + 1, dtype=torch.bfloat16)[1:]       # 2 bytes past a line
    assert shifted.data_ptr() % 64 != 0
    packed = torch.randint(0, 256, (rows * cols // 2,), dtype=torch.uint8)
    absmax, code = torch.rand(rows * cols // 64), torch.linspace(-1, 1, 16)
    twin = dequantize_4bit_torch(packed, absmax, code, 64, (rows, cols), torch.bfloat16)
    _same(dequantize_4bit(packed, absmax, code, 64, (rows, cols), torch.bfloat16, out=shifted), twin)
    qweight, qzeros = _words(rows, cols // 8), _words(rows // 32, cols // 8)
    scales = (torch.rand(rows // 32, cols) * 0.1).to(torch.bfloat16)
    args = (qweight, qzeros, scales, 4, 32, cols, True)
    _same(dequantize_awq_gemm(*args, out=shifted), dequantize_awq_gemm_torch(*args))
    meta = {"packing": "4bit_u8", "axis": 1, "group_size": cols, "shape": (rows * cols // 16, 16),
            "compute_dtype": torch.bfloat16, "zero": (torch.rand(rows, 1) * 15).to(torch.bfloat16),
            "scale": torch.rand(rows, 1).to(torch.bfloat16)}
    hqq_packed = torch.randint(0, 256, (rows // 2, cols), dtype=torch.uint8)
    _same(dequantize_hqq(hqq_packed, meta, out=shifted), dequantize_hqq_torch(hqq_packed, meta))
    codes, row_scales = torch.randint(-127, 128, (rows, cols), dtype=torch.int8), torch.rand(rows) * 5
    _same(dequant_cpu.rowwise_int8(codes, row_scales, shifted, torch.bfloat16),
          codes.to(torch.bfloat16).mul_((row_scales * (1.0 / 127.0))[:, None]))


@pytest.mark.skipif(not dequant_cpu.f16c(), reason="the vector int8 kernel rounds with F16C")
@pytest.mark.parametrize("mode", range(6))
@pytest.mark.parametrize("cols, stream", [(70, False), (64, True)])
def test_the_vector_int8_kernel_gives_the_scalar_kernels_bits_in_every_mode(mode, cols, stream):
    """A line of a row at a time against one element at a time, on row scales that overflow fp16, fall to
    its subnormals and round to ties; columns past the last whole line (70), whole-line rows streamed (64)."""
    import numpy as np

    from qlora_inject.kernels import dequant_cpu_numba as kernels

    torch.manual_seed(mode)
    rows = 33
    codes = torch.randint(-127, 128, (rows, cols), dtype=torch.int8).numpy()
    scales = (torch.rand(rows) * 5).numpy()
    scales[::3] = np.float32(3e6)                                           # products past fp16's range
    scales[1::3] = np.float32(1e-5)                                         # into fp16's subnormals
    scales[2::5] = np.float32(127 * (1 + 2 ** -9))                          # ties
    out_type = np.float32 if mode <= 2 else np.uint16
    bits = np.uint32 if mode <= 2 else np.uint16
    expected, got = np.zeros(rows * cols, out_type), _lines(rows * cols, out_type)
    kernels.rowwise_int8(codes, scales, mode, expected)
    kernels.rowwise_int8_lines(codes, scales, mode, stream, got)
    assert np.array_equal(got.view(bits), expected.view(bits))


def test_a_large_cpu_scratch_starts_on_a_huge_page_and_asks_for_huge_pages():
    from qlora_inject.kernels import workspace

    buffer = workspace.scratch(3 * workspace.HUGE_PAGE // 2, torch.bfloat16, "cpu")   # 3 MiB
    assert buffer.data_ptr() % workspace.HUGE_PAGE == 0 and buffer.numel() == 3 * workspace.HUGE_PAGE // 2
    buffer.fill_(1.0)
    assert buffer.sum().item() == buffer.numel()
    try:
        setting = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return                                                              # no THP on this system: nothing to see
    if "[never]" in setting:
        return
    start = buffer.data_ptr()
    with open("/proc/self/smaps") as maps:
        huge = region = None
        for line in maps:
            first = line.split()[0]
            if "-" in first and ":" not in first:
                low, high = (int(value, 16) for value in first.split("-"))
                region = low <= start < high
            elif region and line.startswith("AnonHugePages:"):
                huge = int(line.split()[1])
    assert huge is not None and huge >= 2048, f"the scratch's mapping holds {huge} kB of huge pages"
    small = workspace.scratch(100, torch.float16, "cpu")                   # under a huge page: a plain tensor
    assert small.numel() == 100


def test_int8_rows_equal_the_formula():
    codes = torch.randint(-127, 128, (33, 70), dtype=torch.int8)
    scales = torch.rand(33) * 5
    expected = codes.float() * (scales[:, None] * (1.0 / 127.0))
    _same(dequant_cpu.rowwise_int8(codes, scales), expected)
    for dtype in (torch.float16, torch.bfloat16):                        # bitsandbytes: CB.to(dtype) · factor
        _same(dequant_cpu.rowwise_int8(codes, scales, scratch(33 * 70, dtype, "cpu"), dtype),
              codes.to(dtype).mul_((scales * (1.0 / 127.0))[:, None]))


@pytest.mark.parametrize("buffer_dtype", [None, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_int8_dispatch_measures_its_paths_and_each_gives_the_twins_values(buffer_dtype, monkeypatch):
    codes = torch.randint(-127, 128, (64, 96), dtype=torch.int8)
    scales = torch.rand(64) * 5
    out = None if buffer_dtype is None else scratch(64 * 96, buffer_dtype, "cpu")
    half = buffer_dtype in (torch.float16, torch.bfloat16)                 # a half scratch: the twin, rounded to it
    twin = dequantize_int8_rowwise_torch(codes, scales).to(buffer_dtype if half else torch.float32)
    for forced in ("numba", "torch"):
        monkeypatch.setenv("QLORA_INJECT_KERNEL", forced)
        _same(dequantize_int8_rowwise(codes, scales, out), twin)
    monkeypatch.setenv("QLORA_INJECT_KERNEL", "auto")
    for _ in range(3):                                                    # first use, measured use, kept choice
        _same(dequantize_int8_rowwise(codes, scales, out), twin)
    (key, (chosen, timings)), = [(k, v) for k, v in autotune.decisions().items() if k[0] == "int8"]
    assert chosen in timings and {"numba", "torch"} <= set(timings)


def test_scratch_is_shared_grows_and_is_used_by_the_kernels():
    small = scratch(10, torch.float32, "cpu")
    again = scratch(8, torch.float32, torch.device("cpu"))
    assert again.data_ptr() == small.data_ptr()
    packed = torch.randint(0, 256, (4096,), dtype=torch.uint8)
    out = scratch(8192, torch.float32, "cpu")
    weight = dequantize_4bit(packed, torch.rand(128), torch.linspace(-1, 1, 16), 64, (64, 128), torch.float32, out=out)
    assert weight.data_ptr() == out.data_ptr()


def test_a_numba_that_does_not_import_falls_back_to_the_twins_with_a_warning(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def broken_numba(name, *args, **kwargs):
        if name == "numba":
            raise ImportError("Numba needs NumPy 2.3 or less")              # what a mismatched build says
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken_numba)
    dequant_cpu.available.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="numba is installed but does not import"):
            assert not dequant_cpu.available()
        packed = torch.randint(0, 256, (64,), dtype=torch.uint8)
        args = (packed, torch.rand(2), torch.linspace(-1, 1, 16), 64, (8, 16), torch.float32)
        assert torch.equal(dequantize_4bit(*args), dequantize_4bit_torch(*args))
    finally:
        dequant_cpu.available.cache_clear()


_POOL_PROBE = """
import os, sys, warnings, torch
torch.set_num_threads(1)
if sys.argv[1] == "numba-first":
    import numba
from qlora_inject.kernels import dequant_cpu
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert dequant_cpu.available()
import numba
print(numba.config.NUMBA_NUM_THREADS, os.environ.get("NUMBA_NUM_THREADS"), [str(w.message) for w in caught])
"""


def _pool_probe(mode: str, **env: str) -> tuple[int, str | None, list[str]]:
    import ast
    import os
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items()
             if k not in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "QLORA_INJECT_NUMBA_POOL")}
    done = subprocess.run([sys.executable, "-c", _POOL_PROBE, mode], env={**clean, **env}, capture_output=True,
                          text=True, timeout=120, check=True)
    pool, variable, warned = done.stdout.strip().splitlines()[-1].split(" ", 2)
    return int(pool), None if variable == "None" else variable, ast.literal_eval(warned)


@pytest.mark.skipif((__import__("os").cpu_count() or 1) < 2, reason="needs a pool numba would size above one thread")
def test_numbas_pool_is_sized_to_torchs_threads_unless_the_user_set_it():
    """One torch thread per process (torchrun's default) with numba's pool at the core count ran DDP 2.9x
    slower: numba's idle workers spun on the cores the other ranks needed."""
    assert _pool_probe("ours-first") == (1, "1", [])
    assert _pool_probe("ours-first", NUMBA_NUM_THREADS="2")[:2] == (2, "2")          # the user's choice stands
    inherited = {"NUMBA_NUM_THREADS": "2", "QLORA_INJECT_NUMBA_POOL": "2"}              # a 2-thread parent's
    assert _pool_probe("ours-first", **inherited)[:2] == (1, "1")                   # sized again in the child
    pool, _, warned = _pool_probe("numba-first")                                     # too late to size it
    assert pool > 1 and any("NUMBA_NUM_THREADS=1 before anything imports numba" in w for w in warned), warned


def test_the_first_use_measures_every_path_keeps_the_fastest_and_later_calls_run_only_it(monkeypatch):
    monkeypatch.delenv("QLORA_INJECT_KERNEL")
    calls = {"numba": 0, "torch": 0}

    def path(name, seconds):
        def run():
            calls[name] += 1
            time.sleep(seconds)
            return name
        return run

    paths = {"numba": path("numba", 0.02), "torch": path("torch", 0.001)}
    assert autotune.choose(("test", 1), paths) == "numba"                    # used once: the first, unmeasured
    assert calls == {"numba": 1, "torch": 0} and not autotune.decisions()
    assert autotune.choose(("test", 1), paths) == "torch"                    # used again: measured
    assert calls["numba"] >= 3 and calls["torch"] >= 2                       # a warm-up and a timed run each
    measured = dict(calls)
    for _ in range(3):
        assert autotune.choose(("test", 1), paths) == "torch"
    assert calls == {"numba": measured["numba"], "torch": measured["torch"] + 3}
    assert autotune.decisions()[("test", 1)][0] == "torch"
    monkeypatch.setenv("QLORA_INJECT_KERNEL", "numba")                      # the override wins over the choice
    assert autotune.choose(("test", 1), paths) == "numba"


def test_one_stalled_timing_does_not_drop_the_fastest_path(monkeypatch):
    """A candidate's first timed call stalled by another process (GPTQ's 2-thread kernel once took 79.8 ms,
    14 ms otherwise) is timed again before anything is dropped."""
    monkeypatch.delenv("QLORA_INJECT_KERNEL", raising=False)
    delays = iter([0.001, 0.001, 0.08])                             # first use, warm-up, then one stalled call

    def numba_path():
        time.sleep(next(delays, 0.001))
        return "numba"

    def torch_path():
        time.sleep(0.01)
        return "torch"

    key = ("test", "stall")
    paths = {"numba": numba_path, "torch": torch_path}
    autotune.choose(key, paths)                                             # first use: not measured
    assert autotune.choose(key, paths) == "numba"


def test_a_dispatcher_measures_once_per_shape_class_and_every_path_gives_the_same_bits(monkeypatch):
    monkeypatch.delenv("QLORA_INJECT_KERNEL")
    packed = torch.randint(0, 256, (64 * 1024,), dtype=torch.uint8)
    args = (packed, torch.rand(2048) * 3, torch.linspace(-1, 1, 16), 64, (256, 512), torch.bfloat16)
    twin = dequantize_4bit_torch(*args)
    for _ in range(2):                                                      # the second use measures
        _same(dequantize_4bit(*args, out=scratch(256 * 512, torch.float32, "cpu")), twin)
    (key, (chosen, timings)), = autotune.decisions().items()
    assert set(timings) >= {"numba", "torch"} and chosen in timings
    monkeypatch.setattr(autotune, "_measure", lambda *a: pytest.fail("measured a second time"))
    _same(dequantize_4bit(*args, out=scratch(256 * 512, torch.float32, "cpu")), twin)
    data = packed.view(torch.uint8)
    kernels = dequant_cpu.candidates(lambda: dequant_cpu.blockwise_4bit(data, args[1], args[2], 64, 256 * 512,
                                                                        torch.bfloat16).view(256, 512))
    assert len(kernels) == len({dequant_cpu.default_threads(), max(1, dequant_cpu.default_threads() // 2)})
    for run in kernels.values():                                           # each thread count: the same bits
        _same(run(), twin)


def test_an_unknown_kernel_override_is_refused_naming_the_choices(monkeypatch):
    monkeypatch.setenv("QLORA_INJECT_KERNEL", "fast")
    with pytest.raises(ValueError, match=r"QLORA_INJECT_KERNEL='fast' is not one of auto, numba, torch"):
        dequantize_4bit(torch.zeros(8, dtype=torch.uint8), torch.ones(1), torch.linspace(-1, 1, 16), 64, (4, 4),
                        torch.float32)


def test_the_kernels_leave_their_tensors_storage_resizable():
    """FSDP2 frees a gathered weight by resizing its storage to 0; `tensor.numpy()` would forbid that."""
    packed = torch.randint(0, 256, (64,), dtype=torch.uint8)
    absmax = torch.rand(2, dtype=torch.float16)                             # a temporary fp32 copy inside
    out = torch.empty(128)
    weight = dequantize_4bit(packed, absmax, torch.linspace(-1, 1, 16), 64, (8, 16), torch.float32, out=out)
    _same(weight, dequantize_4bit_torch(packed, absmax.float(), torch.linspace(-1, 1, 16), 64, (8, 16),
                                            torch.float32))
    for tensor in (packed, absmax, out):
        tensor.untyped_storage().resize_(0)
