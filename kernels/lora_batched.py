"""Many adapters in one batch: token t uses adapter `index[t]` (−1: none), in one gathered pass.

    delta[t] = s[i] · B[i] A[i] x[t],   i = index[t]

Adapters are stacked with their ranks zero-padded to the largest, so shrink (x·Aᵀ) and expand
(h·Bᵀ) are each one batched contraction over gathered factors instead of a loop over adapters.
Gathering costs tokens × r × (in + out) elements: meant for decode-sized batches (serving many
adapters), where the per-adapter loop's many small launches dominate. `lora_gathered` dispatches:
the Triton shrink/expand of `lora_batched_triton` on CUDA outside autograd, else the pure-torch twin
`lora_gathered_torch` (the CPU path and the kernel's oracle). `lora_looped` is the per-adapter loop
the gathered form replaces: a baseline for the benchmark and an independent check of the twin's math.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qlora_inject.kernels import triton_runs


def stack_adapters(pairs: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """[(A (r_i, in), B (out, r_i))] → A (n, r, in), B (n, out, r), zero-padded to the largest rank."""
    rank = max(A.shape[0] for A, _ in pairs)
    stacked_A = torch.stack([torch.nn.functional.pad(A, (0, 0, 0, rank - A.shape[0])) for A, _ in pairs])
    stacked_B = torch.stack([torch.nn.functional.pad(B, (0, rank - B.shape[1])) for _, B in pairs])
    return stacked_A, stacked_B


def lora_gathered_torch(x: Tensor, A: Tensor, B: Tensor, scaling: Tensor, index: Tensor) -> Tensor:
    """Pure-torch twin of `lora_gathered`: the per-token LoRA update, (tokens, out).

    Args:
        x: (tokens, in) input.
        A: (n, r, in) and B: (n, out, r) stacked factors; scaling: (n,).
        index: (tokens,) adapter of each token, −1 for none.
    """
    active = index >= 0
    chosen = index.clamp_min(0)
    hidden = torch.einsum("ti,tri->tr", x, A[chosen])                            # shrink: (tokens, r)
    hidden = hidden * (scaling[chosen] * active).to(hidden.dtype)[:, None]
    return torch.einsum("tr,tor->to", hidden, B[chosen])                         # expand: (tokens, out)


def lora_looped(x: Tensor, A: Tensor, B: Tensor, scaling: Tensor, index: Tensor) -> Tensor:
    """The same update with one pair of matmuls per adapter present (a baseline and a check, not the twin)."""
    delta = x.new_zeros(x.shape[0], B.shape[1])
    for adapter in index.unique().tolist():
        if adapter < 0:
            continue
        rows = (index == adapter).nonzero().squeeze(1)
        delta[rows] = scaling[adapter] * (x[rows] @ A[adapter].t() @ B[adapter].t())
    return delta


def lora_gathered(x: Tensor, A: Tensor, B: Tensor, scaling: Tensor, index: Tensor) -> Tensor:
    """The Triton shrink/expand for CUDA tensors outside autograd (serving), else `lora_gathered_torch`."""
    if triton_runs(x) and not torch.is_grad_enabled():
        from qlora_inject.kernels.lora_batched_triton import lora_gathered_triton

        return lora_gathered_triton(x, A, B, scaling, index)
    return lora_gathered_torch(x, A, B, scaling, index)
