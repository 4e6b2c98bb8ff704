"""Which CPU dequantization path runs: measured on this machine at first use, then kept.

The same kernel is not the fastest on every CPU (the issue that asked for this saw the NF4 numba
kernel take 34 ms on an Intel Xeon against 8.6–9 ms on an AMD EPYC), so nothing here is tuned to one
machine. The first time a dispatcher dequantizes a weight of a given shape class — (format, dtype,
output buffer's dtype, size to the nearest power of two, torch's thread count) — it runs the first
candidate (the numba kernel where it applies); the second time, every candidate path on that very
weight, interleaved, keeping the fastest for the rest of the process (another path replaces the first
only when `MARGIN` times faster: a near-tie keeps the first). (A class used only once, as
by the injection-time self-check or a merge, is never worth a measurement that runs the slow twin.)
Every dequantization candidate computes the same bits (the numba kernels at each thread count, the
pure-torch twin, and the owning library's own dequantization where it is bit-identical), so that
choice changes the speed and never the result. The fused op's base products are chosen the same way
between the whole dense weight (`torch`) and tiles of rows (`numba-tiles`, `dequant_matmul_tiled`),
which agree within the bound stated there (the same fp32 sums per output column, the input gradient
summed in another order).

`QLORA_INJECT_KERNEL=numba|torch|auto` overrides the choice (for debugging; `auto` is the default):
`numba` runs the numba kernel at torch's thread count whenever it applies (and the tiled products),
`torch` the torch twin (and the whole-weight products).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")
MODES = ("auto", "numba", "torch")
ENV = "QLORA_INJECT_KERNEL"

_choices: dict[tuple, str] = {}
_seen: set[tuple] = set()                                               # classes used once, not yet measured
_timings: dict[tuple, dict[str, float]] = {}
_lock = threading.RLock()                                               # re-entrant: a measured candidate (the tiled
                                                                        # product) dispatches a measured dequantization


def mode() -> str:
    """The `QLORA_INJECT_KERNEL` setting: `auto` (measure), `numba` or `torch` (force that path)."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV}={os.environ[ENV]!r} is not one of {', '.join(MODES)}; unset it to let the "
                         "library measure the fastest CPU dequantization path (auto)")
    return value


def shape_class(fmt: str, dtype: torch.dtype, numel: int, out: torch.Tensor | None) -> tuple:
    """The key a choice is kept under: weights in one class take the same path."""
    return (fmt, dtype, None if out is None else out.dtype, max(numel, 1).bit_length(), torch.get_num_threads())


MARGIN = 1.1   # a candidate replaces the first (all threads) only this much faster: a near-tie is noise, and in a
               # training step the 1-thread kernel kept on 6.8 against 6.9 ms cost 4.4 ms more (NF4, the EPYC)


def choose(key: tuple, candidates: dict[str, Callable[[], T]], margin: float | dict[str, float] = MARGIN) -> T:
    """Run the kept (or forced) candidate for `key`; at the class's first use the first candidate, at
    its second every candidate, measured, keeping the fastest.

    Args:
        key: The shape class (`shape_class`).
        candidates: Name → a call computing the weight; every one must give the same values. Names
            start with `numba` for the numba kernels (the first of them is the default thread count)
            and `torch` for the pure-torch twin, which must be present.
        margin: Another candidate replaces the first only when `margin` (or `margin[name]`, by default
            `MARGIN`) times faster than it (a path
            whose best time hides a larger spread, such as many small parallel regions, must win clearly).

    Returns:
        What the chosen candidate returns.
    """
    forced = mode()
    if forced != "auto":
        name = next((n for n in candidates if n.startswith(forced)), "torch")
        return candidates[name]()
    if len(candidates) == 1:
        return next(iter(candidates.values()))()
    name = _choices.get(key)
    if name is None or name not in candidates:
        with _lock:                                                      # one measurement per class at a time
            name = _choices.get(key)
            if (name is None or name not in candidates) and key not in _seen:
                _seen.add(key)                                           # a class used once (an injection-time
                return next(iter(candidates.values()))()                 # check, a merge) is not worth measuring
            if name is None or name not in candidates:
                name = _measure(key, candidates, margin)
    return candidates[name]()


def _measure(key: tuple, candidates: dict[str, Callable[[], T]], margin: float | dict[str, float] = MARGIN,
             rounds: int = 3) -> str:
    """Time each candidate on the real weight, interleaved so all see the same machine; keep the fastest.

    A warm-up call first (numba compiles or loads from its cache; a fresh buffer is paged in); then up
    to `rounds` timed calls each, the best of them counting, dropping from the second round on a
    candidate over twice the best so far (the torch twin is often 10× slower and need not run three
    times). Every candidate is timed twice at least: one call stalled by another process (seen: GPTQ's
    2-thread kernel at 79.8 ms once, 14 ms otherwise) must not decide.
    """
    for run in candidates.values():
        run()
    best: dict[str, float] = {}
    alive = list(candidates)
    for round_ in range(rounds):
        for name in alive:
            began = time.perf_counter()
            candidates[name]()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - began)
        fastest = min(best[n] for n in alive)
        if round_ >= 1:
            alive = [n for n in alive if best[n] <= 2 * fastest]
    default = next(iter(candidates))
    margins = margin if isinstance(margin, dict) else dict.fromkeys(candidates, margin)
    chosen = min(alive, key=lambda n: best[n] * (1.0 if n == default else margins.get(n, MARGIN)))
    _choices[key] = chosen
    _timings[key] = dict(best)
    return chosen


def kept(key: tuple) -> str | None:
    """The candidate kept for `key`, or None before its measurement."""
    return _choices.get(key)


def decisions() -> dict[tuple, tuple[str, dict[str, float]]]:
    """Every kept choice with the best times (seconds) measured for it: for benchmarks and debugging."""
    return {key: (name, dict(_timings.get(key, {}))) for key, name in _choices.items()}


def reset() -> None:
    """Forget every choice (the next dequantization of each class measures again)."""
    _choices.clear()
    _timings.clear()
    _seen.clear()
