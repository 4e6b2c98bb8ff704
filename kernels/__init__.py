"""Compute kernels, installed as `qlora_inject.kernels` (never as a top-level `kernels`).

Each op comes as a pure-torch reference that runs everywhere and is the test oracle; a Triton
version sits beside it where one exists, chosen on CUDA, and a numba version for the dequantizers,
chosen on CPU (`dequant_cpu`). Fast paths write into the shared scratch of `workspace`.
"""

from __future__ import annotations

import importlib.util

import torch


def triton_runs(tensor: torch.Tensor) -> bool:
    """Whether the Triton version of an op runs for `tensor`: on CUDA, with Triton installed."""
    return tensor.is_cuda and importlib.util.find_spec("triton") is not None
