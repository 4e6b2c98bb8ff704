"""Compute kernels, installed as `qlora_inject.kernels` (never as a top-level `kernels`).

Each op comes as a pure-torch reference that runs everywhere and is the test oracle; a Triton
version sits beside it where one exists, chosen on CUDA, and a numba version for the dequantizers,
chosen on CPU (`dequant_cpu`). Fast paths write into the shared scratch of `workspace`.

Names follow one rule. For an op `<op>` defined in `x.py`:
- `<op>` is the dispatcher callers use: it picks the Triton kernel on CUDA, on the CPU the path
  `autotune` measured fastest, else the twin;
- `<op>_torch`, in `x.py` beside it, is its pure-torch twin: the oracle every kernel is tested
  against (`dequantize_4bit_torch`, `dequantize_gptq_torch`, `lora_gathered_torch`, ...);
- `<op>_triton`, in `x_triton.py`, is the checked wrapper of its `@triton.jit` kernels (`_..._kernel`);
  a kernel covering part of the op names that part (`dequantize_gptq4_triton`: 4 bits only);
- the numba kernels, for the CPU dequantizers, are `dequant_cpu.<format>` (compiled in
  `dequant_cpu_numba`).
An op with no kernel (`dequantize_awq_gemv`, `dequantized_linear`) has only its plain name.
"""

from __future__ import annotations

import importlib.util

import torch


def triton_runs(tensor: torch.Tensor) -> bool:
    """Whether the Triton version of an op runs for `tensor`: on CUDA, with Triton installed."""
    return tensor.is_cuda and importlib.util.find_spec("triton") is not None
