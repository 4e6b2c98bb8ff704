"""CPU dequantization kernels, compiled with numba: the fast path beside each pure-torch twin.

A torch twin runs several full passes over the weight (unpack, gather, subtract, scale), each
writing a tensor as large as the dense weight; on a CPU that costs 100–200 ms for a 4096 × 11008
layer, more than the layer's matmul. These kernels make one parallel pass that writes each element
once. On CPUs with AVX-512 F + BW, NF4/FP4 and HQQ (one zero/scale per group row) look up 32 codes
per permute instruction in a 16-entry table held in a register (`*_avx512` in `dequant_cpu_numba`):
on a 2-core AMD EPYC, 4096 × 11008 into bf16 in 5–7 ms, against 4 ms to write the weight at all
(the scalar kernels 22.7 / 35.5 ms, bitsandbytes' own C++ about 40 ms).

Every kernel computes exactly what its twin computes, in fp32, and rounds to fp16/bf16 as torch
does (ties to even), so the results are bit-identical: the twins stay the oracle (tests compare
the two), and the dispatchers in `dequant_4bit`, `dequant_gptq` and `dequant_hqq` pick these on CPU
when numba is installed. Outputs go into a caller-given scratch (the shared workspace of
`kernels.workspace`), fp32 or the half-precision compute dtype itself (written as bit patterns,
with no fp32 copy), or a new tensor. Where that buffer starts on a cache line (torch's allocations do), the
vector kernels write it with non-temporal stores (`_streams`): the weight goes to memory without first being
read into the caches, which it would overflow anyway (AMD EPYC, 11008 × 4096 into bf16: NF4 5.4–6.3 → 4.2–4.8
ms, HQQ 5.1–5.6 → 3.8–4.0; into fp32 every 4-bit format 8.1–10.3 → 5.2–7.4). The numba code is in
`dequant_cpu_numba`.
Layouts follow the packing: NF4/FP4, int8 and HQQ write (out, in) row-major; GPTQ and AWQ, which
pack along out_features, write (in, out) and the dispatcher returns its transpose (a view).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import threading
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from qlora_inject.kernels.workspace import scratch_or_new

POOL_ENV = "NUMBA_NUM_THREADS"
OURS_ENV = "QLORA_INJECT_NUMBA_POOL"        # the value this library gave POOL_ENV (a child process inherits both)


@functools.cache
def available() -> bool:
    """True when numba imports (the kernels compile on first use, then come from its cache).

    A numba that is installed but fails to import (say, built for another numpy) is reported once
    and the torch twins are used instead.

    numba starts its thread pool at `NUMBA_NUM_THREADS` threads (the core count unless set), read at its
    import. Left at that, a process given fewer torch threads (one per rank under torchrun, which sets
    `OMP_NUM_THREADS=1`) keeps numba's extra workers spinning after every kernel, on the cores the other
    ranks' torch threads need: a DDP step on 2 ranks × 1 thread ran 2.9× slower (NF4, 530 against 1,541
    tokens/s, AMD EPYC 2 cores), and no measurement of the kernel alone can see it, since the cost lands on
    the rest of the step. So unless the user set it, numba is imported with its pool sized to torch's
    thread count. The variable stays set (numba refuses a change once its pool runs), marked as this
    library's by `QLORA_INJECT_NUMBA_POOL`, so a child process that inherits it (a DDP worker started with
    one thread) sizes its own pool again rather than taking the parent's for the user's choice.
    """
    if importlib.util.find_spec("numba") is None:
        return False                                                        # not installed: no warning
    if "numba" not in sys.modules and _pool_is_ours():                      # numba sizes its pool at import
        os.environ[POOL_ENV] = os.environ[OURS_ENV] = str(torch.get_num_threads())
    try:
        import numba
    except Exception as err:                                                # any import failure: fall back
        warnings.warn(f"numba is installed but does not import ({err}); dequantizing on the CPU with the "
                      "slower torch twins instead. Reinstall it: pip install --force-reinstall numba",
                      RuntimeWarning, stacklevel=2)
        return False
    if numba.config.NUMBA_NUM_THREADS > torch.get_num_threads() and _pool_is_ours():
        warnings.warn(f"numba was imported before qlora_inject with a pool of {numba.config.NUMBA_NUM_THREADS} "
                      f"threads, more than torch's {torch.get_num_threads()}; its idle workers will take cores from "
                      f"torch's (one process per core, as under torchrun, slows 2-4x). Set {POOL_ENV}="
                      f"{torch.get_num_threads()} before anything imports numba", RuntimeWarning, stacklevel=2)
    return True


def _pool_is_ours() -> bool:
    """True unless the user chose numba's pool size (`NUMBA_NUM_THREADS` set, and not by this library)."""
    return os.environ.get(POOL_ENV) in (None, os.environ.get(OURS_ENV))


@functools.cache
def _kernels():
    module = importlib.import_module("qlora_inject.kernels.dequant_cpu_numba")
    names = ("blockwise_4bit", "blockwise_4bit_avx512", "blockwise_4bit_in_major", "blockwise_8bit",
             "blockwise_8bit_avx512", "rowwise_int8", "rowwise_int8_lines", "gptq", "gptq_4bit", "awq", "awq_4bit",
             "hqq_4bit", "hqq_4bit_avx512", "convert", "convert_fp16_soft")
    return {name: getattr(module, name) for name in names}


@functools.cache
def avx512() -> bool:
    """True when the NF4/FP4 and HQQ kernels can look their codes up 32 at a time (AVX-512 F and BW, numba
    compiling for this CPU): `dequant_cpu_numba.blockwise_4bit_avx512`, `hqq_4bit_avx512`."""
    return importlib.import_module("qlora_inject.kernels.dequant_cpu_numba").avx512_available()


@functools.cache
def f16c() -> bool:
    """True when the CPU converts fp32 → fp16 in hardware (F16C) and numba compiles for it: the vector
    kernels that round 16 lanes at once (`dequant_cpu_numba.gptq_4bit`, AWQ's 4-bit rows) need it."""
    return importlib.import_module("qlora_inject.kernels.dequant_cpu_numba").F16C


_threads = threading.local()                                               # a candidate's thread count


def default_threads() -> int:
    """The numba kernels' thread count: torch's (so the two pools never ask for more cores than torch
    uses), capped by numba's own limit."""
    import numba

    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def candidates(call: Callable[[], Tensor]) -> dict[str, Callable[[], Tensor]]:
    """`call` (a numba kernel's wrapper) at the default thread count and at half of it, as named
    candidates for `autotune.choose`: on a loaded or memory-bound machine fewer threads can be faster."""
    counts = dict.fromkeys((default_threads(), max(1, default_threads() // 2)))
    return {("numba" if n == default_threads() else f"numba-{n}-threads"): functools.partial(with_threads, n, call)
            for n in counts}


def with_threads(count: int, call: Callable[[], Tensor]) -> Tensor:
    """`call()` with the numba kernels it runs on `count` threads."""
    _threads.count = count
    try:
        return call()
    finally:
        _threads.count = None


def _kernel(name: str):
    import numba

    numba.set_num_threads(getattr(_threads, "count", None) or default_threads())
    return _kernels()[name]


_HALF_MODES = {torch.float16: 3, torch.bfloat16: 4}
_IN_FP32_MODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _target(numel: int, dtype: torch.dtype, out: Tensor | None):
    """Where a kernel writes `numel` elements of `dtype`'s values: `(result, array, mode)`.

    An fp32 `out` (the fp32 scratch) receives them as fp32 (holding `dtype`'s values, so an fp32
    matmul sees what the twin gives after `.to(float32)`); fp32 values asked into a half-precision
    `out` (an fp32 layer under autocast), or fp16 values into a bf16 `out` (GPTQ/AWQ in a bf16 model),
    are rounded to it, as `.to(out.dtype)` of the twin would be; otherwise they go to `out` (or a new
    tensor) in `dtype` itself. Half precision is written as bit
    patterns, with no fp32 copy on the way.
    """
    import numpy as np

    cpu = torch.device("cpu")
    fits = out is not None and out.device == cpu and out.numel() >= numel
    if fits and out.dtype == torch.float32:
        result = out.view(-1)[:numel]
        return result, _array(result), _IN_FP32_MODES[dtype]
    if fits and dtype == torch.float32 and out.dtype in _HALF_MODES:
        dtype = out.dtype
    twice = fits and dtype == torch.float16 and out.dtype == torch.bfloat16  # fp16 values (GPTQ/AWQ scales) into
    if twice:                                                               # a bf16 scratch: no fp16 copy between
        dtype = torch.bfloat16
    result = scratch_or_new(out, numel, dtype, cpu)
    if dtype == torch.float32:
        return result, _array(result), 0
    return result, _array(result.view(torch.int16)).view(np.uint16), 5 if twice else _HALF_MODES[dtype]


def blockwise_4bit(data: Tensor, absmax: Tensor, code: Tensor, blocksize: int, numel: int, dtype: torch.dtype,
                   out: Tensor | None = None) -> Tensor:
    """NF4/FP4 codes (raw bytes) → flat weight of `numel` elements, the twin's values in `dtype`
    (in fp32 when `out` is an fp32 scratch, see `_target`)."""
    packed, scales, table = _4bit_arrays(data, absmax, code)
    result, array, mode = _target(numel, dtype, out)
    whole = numel // blocksize if blocksize % 32 == 0 and avx512() else 0   # blocks looked up 32 codes at a time
    if whole:
        _kernel("blockwise_4bit_avx512")(packed, scales, table, blocksize, whole, mode, _streams(array), array)
    done = whole * blocksize
    if done < numel:                                                        # a partial last block, or no AVX-512
        _kernel("blockwise_4bit")(packed[done // 2:], scales[whole:], table, blocksize, numel - done, mode,
                                  array[done:])
    return result


def in_major_fits(shape: tuple[int, ...], blocksize: int, dtype: torch.dtype, out: Tensor | None) -> bool:
    """True when `blockwise_4bit_in_major` can write this weight: AVX-512, fp16/bf16 values into a buffer of
    that dtype (or a new one), rows a multiple of 32, whole blocks of a multiple of 32 per row."""
    if len(shape) != 2 or dtype not in _HALF_MODES or (out is not None and out.dtype != dtype):
        return False
    rows, cols = shape
    return avx512() and rows % 32 == 0 and blocksize % 32 == 0 and cols % blocksize == 0


def blockwise_4bit_in_major(data: Tensor, absmax: Tensor, code: Tensor, blocksize: int, shape: tuple[int, int],
                            dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
    """`blockwise_4bit` of a (rows, cols) weight written in-major, its transpose contiguous: returned as the
    (rows, cols) view of that (cols, rows) memory, the same values. Only where `in_major_fits`."""
    rows, cols = shape
    arrays = _4bit_arrays(data, absmax, code)
    result, array, mode = _target(rows * cols, dtype, out)
    _kernel("blockwise_4bit_in_major")(*arrays, blocksize, rows, cols, mode, _streams(array, rows), array)
    return result.view(cols, rows).t()


def _4bit_arrays(data: Tensor, absmax: Tensor, code: Tensor):
    """The 4-bit kernels' arrays: packed bytes, fp32 block scales, the 16-value fp32 code table (checked)."""
    if code.numel() < 16:
        raise ValueError(f"a 4-bit code table has 16 values, this one {code.numel()}; pass the layer's "
                         "quant_state.code (NF4 or FP4)")
    return _array(data), _array(absmax.float().contiguous()), _array(code.float().cpu()[:16].contiguous())


def blockwise_8bit(codes: Tensor, code: Tensor, absmax: Tensor, blocksize: int, offset: Tensor | float) -> Tensor:
    """8-bit blockwise codes (double quantization's absmax) → fp32 `code[c] · absmax[i // blocksize] + offset`,
    the twin's bits, in one pass."""
    result = torch.empty(codes.numel(), dtype=torch.float32)
    gathers = avx512() and code.numel() >= 256                               # every byte indexes the table
    _kernel("blockwise_8bit_avx512" if gathers else "blockwise_8bit")(
        _array(codes.contiguous().view(-1).view(torch.uint8)), _array(code.float().contiguous()),
        _array(absmax.float().contiguous()), blocksize, float(offset), _array(result))
    return result


def rowwise_int8(codes: Tensor, row_scales: Tensor, out: Tensor | None = None,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """LLM.int8 rows: `CB · (SCB · fp32(1/127))` as (out, in), rounded as bitsandbytes' CPU training
    path, in `dtype` (fp32 when `out` is an fp32 scratch)."""
    rows, cols = codes.shape
    result, array, mode = _target(rows * cols, dtype, out)
    arrays = (_array(codes.contiguous()), _array(row_scales.float().contiguous()), mode)
    if f16c():
        _kernel("rowwise_int8_lines")(*arrays, _streams(array, cols), array)
    else:
        _kernel("rowwise_int8")(*arrays, array)
    return result.view(rows, cols)


def gptq(qweight: Tensor, zeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int, in_features: int,
         out: Tensor | None = None) -> Tensor:
    """GPTQ with unpacked int32 zeros (groups, out) → (in, out), values in `scales.dtype` (see `_target`)."""
    out_features = qweight.shape[1]
    result, array, mode = _target(in_features * out_features, scales.dtype, out)
    arrays = (_array(qweight.contiguous()), _array(zeros.to(torch.int32).contiguous()),
              _array(scales.float().contiguous()), _array(g_idx.to(torch.int64).contiguous()))
    if bits == 4 and f16c():
        _kernel("gptq_4bit")(*arrays, in_features, mode, _streams(array, out_features), array)
    else:
        _kernel("gptq")(*arrays, bits, in_features, mode, array)
    return result.view(in_features, out_features)


def awq(qweight: Tensor, zeros: Tensor, scales: Tensor, group_size: int, positions: tuple[int, ...], bits: int,
        out_features: int, out: Tensor | None = None) -> Tensor:
    """AWQ GEMM layout with unpacked int32 zeros (groups, out) → (in, out), values in `scales.dtype`."""
    import numpy as np

    in_features = qweight.shape[0]
    result, array, mode = _target(in_features * out_features, scales.dtype, out)
    arrays = (_array(qweight.contiguous()), _array(zeros.to(torch.int32).contiguous()),
              _array(scales.float().contiguous()), group_size, np.asarray(positions, dtype=np.int64))
    if bits == 4 and f16c():
        _kernel("awq_4bit")(*arrays, out_features, mode, _streams(array, out_features), array)
    else:
        _kernel("awq")(*arrays, bits, out_features, mode, array)
    return result.view(in_features, out_features)


def hqq_4bit(packed: Tensor, zero: Tensor, scale: Tensor, rows: int, out: Tensor | None = None,
             dtype: torch.dtype = torch.float32) -> Tensor:
    """HQQ `4bit_u8` codes with zero/scale (in `dtype`) broadcasting as (rows | 1, cols | 1) → (rows, cols):
    `(code − zero) · scale` computed as hqq does in `dtype`, each step rounded to it."""
    cols = packed.shape[1]
    result, array, mode = _target(rows * cols, dtype, out)
    zero, scale = _as_2d(zero), _as_2d(scale)
    per_row = zero.shape[1] == scale.shape[1] == 1                          # axis 1: a table per code row
    arrays = (_array(packed.contiguous()), _array(zero), _array(scale), rows, mode)
    if per_row and cols % 32 == 0 and avx512():
        _kernel("hqq_4bit_avx512")(*arrays, _streams(array, cols), array)
    else:
        _kernel("hqq_4bit")(*arrays, array)
    return result.view(rows, cols)


def _streams(array, row: int = 0) -> bool:
    """True when a kernel may write `array` with non-temporal stores (`dequant_cpu_numba._store`): it starts
    on a 64-byte line and each `row` (elements; 0: the array is written as one run) is whole lines, so every
    store the vector kernels make covers whole aligned lines. A caller's `out` at an offset gets plain stores."""
    return array.ctypes.data % 64 == 0 and row * array.itemsize % 64 == 0


def _array(tensor: Tensor):
    """A numpy array over a contiguous CPU tensor's memory (it keeps the tensor alive), for a kernel call.

    Not `tensor.numpy()`: torch marks a storage exported that way as never resizable again, and FSDP2
    frees a gathered weight by resizing its storage to 0 (it failed on NF4 after a dequantization).
    """
    import numpy as np

    return np.from_dlpack(tensor.detach())


def _as_2d(values: Tensor) -> Tensor:
    values = values.float()
    return (values.reshape(1, 1) if values.dim() == 0 else values.reshape(values.shape[0], -1)).contiguous()
