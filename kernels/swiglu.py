"""SwiGLU as one autograd op: `h = silu(g) · u`, the gate of a Llama MLP (`down(silu(gate(x)) · up(x))`).

Autograd over the eager ops keeps three (tokens × intermediate) tensors per MLP: g for silu's
backward, and silu(g) and u for the product's. This op keeps g and u and recomputes silu(g) in the
backward (one elementwise pass), with `s = sigmoid(g)`:

    du = dy · silu(g)        dg = dy · u · s · (1 + g · (1 − s))

The torch twins below use the very ops the eager module runs (`F.silu`, `aten.silu_backward`), so
on the CPU they agree with it bit for bit; on CUDA the Triton kernels of `swiglu_triton` run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from qlora_inject.kernels import triton_runs


def swiglu_forward_torch(g: Tensor, u: Tensor) -> Tensor:
    """Pure-torch forward: `silu(g) · u`."""
    return F.silu(g) * u


def swiglu_backward_torch(dy: Tensor, g: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """Pure-torch backward: `(dg, du)`."""
    return torch.ops.aten.silu_backward(dy * u, g), dy * F.silu(g)


class SwiGLUFunction(torch.autograd.Function):
    """`swiglu` with a hand-written backward that saves the gate and up projections only."""

    @staticmethod
    def forward(ctx, g: Tensor, u: Tensor) -> Tensor:
        if triton_runs(g):
            from qlora_inject.kernels.swiglu_triton import swiglu_forward_triton as forward
        else:
            forward = swiglu_forward_torch
        ctx.save_for_backward(g, u)
        return forward(g, u)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, Tensor]:
        g, u = ctx.saved_tensors
        if triton_runs(g):
            from qlora_inject.kernels.swiglu_triton import swiglu_backward_triton as backward
        else:
            backward = swiglu_backward_torch
        return backward(dy, g, u)


def swiglu(g: Tensor, u: Tensor) -> Tensor:
    """`silu(g) · u` for the gate `g` and up projection `u` (same shape and dtype)."""
    if g.shape != u.shape or g.dtype != u.dtype:
        raise ValueError(f"swiglu: gate {tuple(g.shape)} {g.dtype} and up {tuple(u.shape)} {u.dtype} differ; "
                         "expected the outputs of two projections of the same input")
    return SwiGLUFunction.apply(g, u)
