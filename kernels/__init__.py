"""Compute kernels, installed as `qlora_inject.kernels` (never as a top-level `kernels`).

Each op comes as a pure-torch reference that runs everywhere and is the test oracle; a Triton
version sits beside it where one exists, chosen on CUDA, and a numba version for the dequantizers,
chosen on CPU (`dequant_cpu`). Fast paths write into the shared scratch of `workspace`.
"""
