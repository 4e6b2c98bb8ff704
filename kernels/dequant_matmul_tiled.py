"""The fused op's two base products, `x · Wᵀ` and `g · W`, with W dequantized whole or a tile of rows at a time.

    whole:  W = dequantize()                       then one matmul (W written whole into the scratch)
    tiled:  out[:, r0:r1] = x · W[r0:r1]ᵀ           (forward: each tile gives its columns of the output)
            grad_x      += g[:, r0:r1] · W[r0:r1]   (input gradient: the tiles' products summed in fp32)

Tiled, only `TILE_BYTES` of dense weight exist at a time, written and read while in cache, instead of
the whole dense weight written to memory and read back once per direction. Which one runs is
measured per shape class on the machine (`autotune`, candidates `torch` = whole and `numba-tiles`),
never fixed: the tiles trade that memory traffic for more, smaller matmuls.

A dispatcher that can dequantize a row range (NF4/FP4 on the CPU with numba: `dequant_4bit`) does
so while `only_rows(start)` is active and marks the request honoured (`RowRequest`); any other
ignores it and returns the whole weight. Each product first asks for its first tile: a weight that
comes back whole is used at once, unmeasured (dense, HQQ, GPTQ, ...); one that tiles is measured per
(product, weight shape, operand size) class, and tiles are kept only when `TILES_MARGIN` times
faster (their ~100 parallel regions per product make their best time hide a wide spread). The pure-torch
oracle is the whole-weight product (`linear_whole`, `grad_input_whole`): the forward's tiles are
each a full-length dot product per element (equal in fp32 here, but BLAS does not promise the same
bits for a narrower matmul), and the input gradient sums the tiles in another order (fp32, then
rounded once to the compute dtype): within a few fp32 ulps of the whole product, or one rounding
of the compute dtype (`tests/test_kernels.py` pins the bound).

In fp16/bf16 the input gradient has a third candidate, `torch-in-major`: the whole weight asked for
in-major (`in_major`; its transpose contiguous, the (out, in) view of (in, out) memory), which oneDNN
reads faster for `g · W` on the AMD EPYC (a layer step's g · W with NF4's dequantization: 42.3 → 37.2 ms).
Only NF4/FP4 write W so today, and only weights that tile are measured; a dispatcher that cannot honour
the request returns W as always (the same values).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from qlora_inject.kernels import autotune

TILE_BYTES = 1 << 20                          # about a core's L2: a tile stays there from its write to its reads
TILES_MARGIN = 1.1                            # tiles run ~100 parallel regions per product: they must win clearly
IN_MAJOR_MARGIN = 1.02                        # one kernel and one matmul, as the whole weight: a small, steady gain
                                              # (AMD EPYC, bf16 g·W: 2.1–5.4 ms of 42–44) is a gain
_MARGINS = {"numba-tiles": TILES_MARGIN, "torch-in-major": IN_MAJOR_MARGIN}
_local = threading.local()
T = TypeVar("T")


@dataclass
class RowRequest:
    """The next dequantization on this thread is asked for the tile of rows that starts at `start`."""

    start: int
    stop: int = 0                             # set by a dispatcher that honours it: the tile is [start, stop)
    rows: int = 0                             # ... and the weight's full row count

    @property
    def honoured(self) -> bool:
        return self.stop > self.start


def only_rows(start: int) -> AbstractContextManager[RowRequest]:
    """Ask dequantizations made inside for one tile of rows from `start` (those that can, do, and say so)."""
    return _asking("request", RowRequest(start))


@contextmanager
def _asking(name: str, request: T) -> Iterator[T]:
    """`request` active on this thread under `name` inside, the one it replaces after."""
    previous = getattr(_local, name, None)
    setattr(_local, name, request)
    try:
        yield request
    finally:
        setattr(_local, name, previous)


def requested_rows() -> RowRequest | None:
    """The active row request on this thread, for a dispatcher to honour (or not)."""
    return getattr(_local, "request", None)


@dataclass
class LayoutRequest:
    """The next dequantization on this thread is asked for W in-major: its transpose contiguous, (in, out) in
    memory, returned as the (out, in) view. A dispatcher that can sets `honoured`; one that cannot returns W
    as it always does (the same values either way)."""

    honoured: bool = False


def in_major() -> AbstractContextManager[LayoutRequest]:
    """Ask dequantizations made inside for W in-major (those that can, do, and say so)."""
    return _asking("layout", LayoutRequest())


def requested_layout() -> LayoutRequest | None:
    """The active in-major request on this thread, for a dispatcher to honour (or not)."""
    return getattr(_local, "layout", None)


def once_per_product(key: tuple, compute: Callable[[], Tensor]) -> Tensor:
    """`compute()`, made once per tiled product for `key` (e.g. a double-quantized absmax, which every
    tile's dequantization would otherwise decode whole again); outside a tiled product, every time."""
    memo = getattr(_local, "memo", None)
    if memo is None:
        return compute()
    if key not in memo:
        memo[key] = compute()
    return memo[key]


def tile_rows(in_features: int, itemsize: int, multiple: int) -> int:
    """Rows per tile: about `TILE_BYTES` of dense weight, a multiple of `multiple` and of 16 (a GEMM
    kernel's width: with such tiles each fp32 output column was the whole matmul's, bit for bit, here)."""
    multiple = math.lcm(multiple, 16)
    rows = TILE_BYTES // max(1, in_features * itemsize)
    return max(multiple, rows // multiple * multiple)


def linear(x: Tensor, dequantize: Callable[[], Tensor], dtype: torch.dtype, bias: Tensor | None,
           shape: tuple[int, int] | None = None) -> Tensor:
    """`x · dequantize()ᵀ + bias` in `dtype`, (tokens, out): whole or tiled, as measured (CPU only).
    `shape`: the weight's (out, in) where the caller knows it (see `_measured`)."""
    if x.device.type != "cpu":
        return linear_whole(x, dequantize, dtype, bias)
    return _measured("x·Wᵀ", x, dequantize, lambda w: _linear(x, w, dtype, bias),
                     {"torch": lambda: linear_whole(x, dequantize, dtype, bias),
                      "numba-tiles": lambda: linear_tiled(x, dequantize, dtype, bias)}, shape)


def grad_input(g: Tensor, dequantize: Callable[[], Tensor], dtype: torch.dtype,
               shape: tuple[int, int] | None = None) -> Tensor:
    """`g · dequantize()` in `dtype`, (tokens, in): whole, whole in-major or tiled, as measured (CPU only)."""
    if g.device.type != "cpu":
        return grad_input_whole(g, dequantize, dtype)
    candidates = {"torch": lambda: grad_input_whole(g, dequantize, dtype),
                  "numba-tiles": lambda: grad_input_tiled(g, dequantize, dtype)}
    if dtype in (torch.float16, torch.bfloat16):                            # no layout won in fp32 (AMD EPYC)
        candidates["torch-in-major"] = lambda: grad_input_in_major(g, dequantize, dtype)
    return _measured("g·W", g, dequantize, lambda w: torch.mm(g, w.to(dtype)), candidates, shape)


def _measured(product: str, left: Tensor, dequantize: Callable[[], Tensor], with_whole: Callable[[Tensor], Tensor],
              candidates: dict[str, Callable[[], Tensor]], shape: tuple[int, int] | None) -> Tensor:
    """A probe asks for the first tile. A weight that cannot tile (or fits one tile) comes back whole and is
    used at once (no measurement). One that can is measured per (product, format, weight shape, left
    operand's size) class between `candidates` (`torch`: the whole weight, first; `numba-tiles`; the input
    gradient's whole weight in-major): tiles kept only when `TILES_MARGIN` times faster than the whole
    weight, in-major when `IN_MAJOR_MARGIN` times. (Only NF4/FP4 tile, and only they write W in-major: int8
    and HQQ in-major kernels were built and measured on the AMD EPYC, 8.3–12.6 and 8.9–11.8 ms against
    4.0–5.3 out-major, a loss or a tie on the whole g · W.) Where the caller gives the weight's `shape` and
    its class has kept a whole weight, that runs with no probe (on the AMD EPYC a probe tile of NF4
    11008 × 4096 cost 0.26 ms per product)."""
    forced = autotune.mode()
    if forced == "torch":                                                   # forced: the whole weight, no probe
        return candidates["torch"]()
    kept = autotune.kept(_class(product, shape, left, dequantize)) if forced == "auto" and shape is not None else None
    if kept is not None and kept != "numba-tiles" and kept in candidates:
        return candidates[kept]()
    _local.memo = {}                                                        # one absmax decode for the whole call
    try:
        with only_rows(0) as probe:
            first = dequantize()
        if not probe.honoured or probe.stop == probe.rows:                  # the whole weight, or one tile of it
            return with_whole(first)
        key = _class(product, (probe.rows, first.shape[1]), left, dequantize)
        return autotune.choose(key, candidates, margin=_MARGINS)
    finally:
        _local.memo = None


def _class(product: str, shape: tuple[int, int], left: Tensor, dequantize: Callable[[], Tensor]) -> tuple:
    """The class a base product's choice is kept under: the product, the weight's format and shape, the left
    operand. The format is `dequantize.format` where its maker set it (the fused LoRA layer does: formats
    differ in what they can write, say W in-major), else none."""
    name = f"base {product} of {getattr(dequantize, 'format', '')} {shape[0]}×{shape[1]}, whole or tiles,"
    return autotune.shape_class(name, left.dtype, left.numel(), left)


def linear_whole(x: Tensor, dequantize: Callable[[], Tensor], dtype: torch.dtype, bias: Tensor | None) -> Tensor:
    """The whole-weight forward: the oracle of `linear_tiled`."""
    return _linear(x, dequantize(), dtype, bias)                            # W (out, in) in the scratch


def grad_input_whole(g: Tensor, dequantize: Callable[[], Tensor], dtype: torch.dtype) -> Tensor:
    """The whole-weight input gradient: the oracle of `grad_input_tiled`."""
    return torch.mm(g, dequantize().to(dtype))


def grad_input_in_major(g: Tensor, dequantize: Callable[[], Tensor], dtype: torch.dtype) -> Tensor:
    """`grad_input_whole` with W asked for in-major (`in_major`): the same values, where the format can write
    them so; oneDNN's bf16 g · W reads a (in, out) weight faster on the AMD EPYC (32–35 against 38–46 ms
    for 11008 × 4096 and 128 tokens)."""
    with in_major():
        weight = dequantize()
    return torch.mm(g, weight.to(dtype))


def linear_tiled(x: Tensor, dequantize: Callable[[], Tensor], dtype: torch.dtype, bias: Tensor | None) -> Tensor:
    """`linear_whole`, a tile of weight rows at a time (the whole weight where the format cannot tile)."""
    out = None
    for request, tile in _tiles(dequantize):
        if not request.honoured:                                            # the whole weight came back
            return _linear(x, tile, dtype, bias)
        if out is None:
            out = torch.empty(x.shape[0], request.rows, dtype=dtype)       # (tokens, out)
        columns, weight = out[:, request.start:request.stop], tile.t().to(dtype)
        if bias is None:
            torch.mm(x, weight, out=columns)
        else:
            torch.addmm(bias[request.start:request.stop].to(dtype), x, weight, out=columns)
    return out


def grad_input_tiled(g: Tensor, dequantize: Callable[[], Tensor], dtype: torch.dtype) -> Tensor:
    """`grad_input_whole`, a tile of weight rows at a time, summed in fp32 (the whole weight where the
    format cannot tile)."""
    total = None
    for request, tile in _tiles(dequantize):
        if not request.honoured:
            return torch.mm(g, tile.to(dtype))
        part = torch.mm(g[:, request.start:request.stop], tile.to(dtype))  # (tokens, in)
        total = part.float() if total is None else total.add_(part)
    return total.to(dtype)


def _linear(x: Tensor, weight: Tensor, dtype: torch.dtype, bias: Tensor | None) -> Tensor:
    weight = weight.t().to(dtype)                                           # (in, out)
    return torch.mm(x, weight) if bias is None else torch.addmm(bias.to(dtype), x, weight)


def _tiles(dequantize: Callable[[], Tensor]) -> Iterator[tuple[RowRequest, Tensor]]:
    """(request, tile) for each tile of rows in order, the tile valid until the next one is made; a
    single unhonoured request with the whole weight where the dispatcher does not tile."""
    start = 0
    outer = getattr(_local, "memo", None)
    _local.memo = {} if outer is None else outer
    try:
        while True:
            with only_rows(start) as request:
                tile = dequantize()
            yield request, tile
            if not request.honoured or request.stop >= request.rows:
                return
            start = request.stop
    finally:
        _local.memo = outer
