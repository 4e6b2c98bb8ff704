"""One reused dequantization buffer per (device, dtype, thread).

A fused LoRA linear dequantizes its base weight, uses it for one matmul, and drops it; the next
layer does the same. Allocating a fresh (out × in) tensor per layer and call churns the allocator
(and on CPU, the page cache); instead each layer writes into this shared scratch, which grows to
the largest layer seen and then stays. A weight written here is valid until the next `scratch`
call on the same device and thread, so callers use it at once and never hand it to autograd.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

_local = threading.local()


def scratch(numel: int, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """A 1-D tensor of at least `numel` elements, shared by every caller on this device and thread."""
    buffers: dict = _local.__dict__.setdefault("buffers", {})
    key = (_indexed(torch.device(device)), dtype)                          # "cuda" and "cuda:0" share one
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffers.pop(key, None)                                              # free the old one first
        buffer = torch.empty(numel, dtype=dtype, device=device)
        buffers[key] = buffer
    return buffer[:numel]


def _indexed(device: torch.device) -> torch.device:
    """`device` with its index spelled out (a bare "cuda" is the current CUDA device)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def scratch_or_new(out: Tensor | None, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """`out[:numel]` when it fits (dtype, device, size), else a new 1-D tensor: for kernels' `out=` argument."""
    if out is not None and out.dtype == dtype and out.device == device and out.numel() >= numel:
        return out.view(-1)[:numel]
    return torch.empty(numel, dtype=dtype, device=device)
