"""Blockwise 4-bit (NF4/FP4) dequantization in bitsandbytes' layout, in pure torch.

Layout: two 4-bit codes per byte, the first element in the high nibble. Element `i` of the
flattened (out, in) weight is `code[q_i] * absmax[i // blocksize]`. With double quantization
the absmax vector is itself stored as 8-bit codes, blockwise, plus a scalar offset:
`absmax[b] = code2[a_b] * absmax2[b // blocksize2] + offset`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from qlora_inject.kernels import autotune, dequant_cpu, dequant_matmul_tiled, triton_runs


def dequantize_blockwise_8bit(codes: Tensor, code: Tensor, absmax: Tensor, blocksize: int,
                              offset: Tensor | float = 0.0) -> Tensor:
    """Dequantize 8-bit blockwise codes: `code[codes[i]] * absmax[i // blocksize] + offset`, fp32 (once per
    tiled product, `dequant_matmul_tiled.once_per_product`: double quantization's absmax for every tile).
    On the CPU with numba, one pass (`dequant_cpu.blockwise_8bit`, the twin's bits); the twin otherwise."""
    def decode() -> Tensor:
        if codes.device.type == "cpu" and dequant_cpu.available():
            return dequant_cpu.blockwise_8bit(codes, code, absmax, blocksize, offset)
        return dequantize_blockwise_8bit_torch(codes, code, absmax, blocksize, offset)

    shift = (offset.data_ptr(), offset._version) if isinstance(offset, Tensor) else offset   # no device sync
    key = tuple((t.data_ptr(), t._version, t.numel()) for t in (codes, code, absmax)) + (blocksize, shift)
    return dequant_matmul_tiled.once_per_product(key, decode)


def dequantize_blockwise_8bit_torch(codes: Tensor, code: Tensor, absmax: Tensor, blocksize: int,
                                    offset: Tensor | float = 0.0) -> Tensor:
    """Pure-torch twin of `dequantize_blockwise_8bit`: fp32 (n,)."""
    values = code.float()[codes.reshape(-1).long()]                          # (n,)
    return _scale_blocks(values, absmax.float(), blocksize) + offset


def dequantize_4bit_torch(
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    blocksize: int,
    shape: tuple[int, ...],
    dtype: torch.dtype,
) -> Tensor:
    """Unpack 4-bit codes and scale each block by its absmax.

    Args:
        packed: The packed storage, any dtype (a float `quant_storage` is read as raw bytes).
        absmax: fp32 per-block scale, `ceil(numel / blocksize)` of them.
        code: The 16-entry lookup table (NF4 or FP4 values in [-1, 1]).
        blocksize: Elements per absmax block.
        shape: Shape of the dense weight, e.g. (out, in).
        dtype: Output dtype.

    Returns:
        The dense weight of `shape`, in `dtype`.
    """
    numel = math.prod(shape)
    data = packed.contiguous().view(-1).view(torch.uint8)                    # (numel / 2,) bytes
    if data.numel() * 2 < numel:
        raise ValueError(f"packed storage holds {data.numel() * 2} codes, the shape {tuple(shape)} needs {numel}")
    # One lookup per byte in a 256 × 2 table of (high, low) code values: half the gathers of a
    # per-nibble lookup, and int32 indices.
    byte = torch.arange(256, device=data.device)
    table = torch.stack((code.float()[byte >> 4], code.float()[byte & 0x0F]), dim=-1)      # (256, 2)
    values = torch.nn.functional.embedding(data.int(), table).view(-1)[:numel]            # (numel,)
    return _scale_blocks(values, absmax.float(), blocksize).view(shape).to(dtype)


def dequantize_4bit(packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, shape: tuple[int, ...],
                    dtype: torch.dtype, out: Tensor | None = None,
                    library: Callable[[], Tensor] | None = None) -> Tensor:
    """The Triton kernel for CUDA tensors; on CPU the fastest of the numba kernel, the pure-torch twin
    and `library`, measured at first use per shape class (`kernels.autotune`); the twin otherwise.
    Asked for a tile of rows (`dequant_matmul_tiled.only_rows`), the numba kernel writes that tile; asked
    for W in-major (`dequant_matmul_tiled.in_major`) where `dequant_cpu.in_major_fits`, the numba kernel
    writes it transposed (or the twin's transpose is copied, as measured), and the (out, in) view returns.

    Args:
        out: Optional 1-D scratch (e.g. `kernels.workspace.scratch`) the result may be written into;
            the returned tensor is then a view of it, in `out`'s dtype (holding `dtype`'s values).
        library: The owning library's own dequantization of this weight, offered as a CPU candidate;
            only where it gives the twin's bits (e.g. bitsandbytes' when rows are whole blocks).
    """
    if triton_runs(packed):
        from qlora_inject.kernels.dequant_4bit_triton import dequantize_4bit_triton

        return dequantize_4bit_triton(packed, absmax, code, blocksize, shape, dtype, out=out)

    def twin() -> Tensor:
        return dequantize_4bit_torch(packed, absmax, code, blocksize, shape, dtype)

    if packed.device.type != "cpu":
        return twin()
    numel = math.prod(shape)
    paths: dict[str, Callable[[], Tensor]] = {}
    data = packed.contiguous().view(-1).view(torch.uint8)
    fits = data.numel() * 2 >= numel and absmax.numel() * blocksize >= numel
    request = dequant_matmul_tiled.requested_rows()
    if request is not None and fits and len(shape) == 2 and dequant_cpu.available():
        return _rows_of(request, data, absmax, code, blocksize, shape, dtype, out)
    layout = dequant_matmul_tiled.requested_layout()
    if layout is not None and fits and dequant_cpu.available() and dequant_cpu.in_major_fits(shape, blocksize, dtype,
                                                                                            out):
        layout.honoured = True
        paths.update(dequant_cpu.candidates(
            lambda: dequant_cpu.blockwise_4bit_in_major(data, absmax, code, blocksize, shape, dtype, out)))
        paths["torch"] = lambda: twin().t().contiguous().t()
        return autotune.choose(autotune.shape_class("4bit in-major", dtype, numel, out), paths)
    if dequant_cpu.available() and fits:
        paths.update(dequant_cpu.candidates(
            lambda: dequant_cpu.blockwise_4bit(data, absmax, code, blocksize, numel, dtype, out).view(shape)))
    paths["torch"] = twin
    if library is not None:
        paths["library"] = library
    return autotune.choose(autotune.shape_class("4bit", dtype, numel, out), paths)


def _rows_of(request: dequant_matmul_tiled.RowRequest, data: Tensor, absmax: Tensor, code: Tensor, blocksize: int,
             shape: tuple[int, ...], dtype: torch.dtype, out: Tensor | None) -> Tensor:
    """The tile of rows `request` asks for, by the numba kernel (a row range is whole absmax blocks
    when its first element is a block's first, so tiles are a multiple of `blocksize / gcd(in, blocksize)`
    rows); the request is marked honoured."""
    rows, cols = shape
    multiple = blocksize // math.gcd(cols, blocksize)
    if request.start % multiple:
        raise ValueError(f"a tile of a 4-bit weight with {cols} columns and blocks of {blocksize} starts at a "
                         f"multiple of {multiple} rows, not at row {request.start}")
    step = dequant_matmul_tiled.tile_rows(cols, torch.empty((), dtype=dtype).element_size(), multiple)
    stop = min(rows, request.start + step)
    first, count = request.start * cols, (stop - request.start) * cols
    last = first + count
    blocks = absmax[first // blocksize:-(-last // blocksize)]
    # One thread: a tile is small, and a numba parallel region between two of torch's would make each
    # OpenMP pool wait for the other's spinning threads (milliseconds per switch, with 2 per tile).
    tile = dequant_cpu.with_threads(1, lambda: dequant_cpu.blockwise_4bit(data[first // 2:(last + 1) // 2], blocks,
                                                                            code, blocksize, count, dtype, out))
    request.stop, request.rows = stop, rows
    return tile.view(stop - request.start, cols)


def _scale_blocks(values: Tensor, absmax: Tensor, blocksize: int) -> Tensor:
    numel = values.numel()
    blocks = absmax.numel()
    if blocks * blocksize < numel:
        raise ValueError(f"{blocks} absmax blocks of {blocksize} cannot cover {numel} elements")
    if blocks * blocksize == numel:                                          # no partial block: no copy
        return (values.view(blocks, blocksize) * absmax[:, None]).view(-1)
    padded = torch.nn.functional.pad(values, (0, blocks * blocksize - numel))
    return (padded.view(blocks, blocksize) * absmax[:, None]).view(-1)[:numel]
