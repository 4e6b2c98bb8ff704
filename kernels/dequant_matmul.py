"""`x · dequantize(W)ᵀ + b` that keeps nothing of W for backward: it dequantizes again instead.

A plain `F.linear(x, dequantize())` makes autograd keep the whole dense weight alive from forward
to backward (the input gradient needs it). For a frozen quantized base that is the largest tensor
a step holds; re-dequantizing in backward costs one more pass over the packed weight and saves
out × in × itemsize bytes per layer. Pure torch: the CPU path and the oracle for fused kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


class DequantizedLinear(torch.autograd.Function):
    """autograd op: forward `F.linear(x, dequantize(), bias)`, backward re-dequantizes."""

    @staticmethod
    def forward(ctx, x: Tensor, dequantize: Callable[[], Tensor], bias: Tensor | None) -> Tensor:
        ctx.dequantize = dequantize
        ctx.has_bias = bias is not None
        return F.linear(x, dequantize().to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad_x = grad @ ctx.dequantize().to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias


def dequantized_linear(x: Tensor, dequantize: Callable[[], Tensor], bias: Tensor | None) -> Tensor:
    """`x · dequantize()ᵀ + bias`, with no dense weight saved for backward."""
    return DequantizedLinear.apply(x, dequantize, bias)
