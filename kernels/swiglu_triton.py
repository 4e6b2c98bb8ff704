"""Triton kernels for SwiGLU, beside their torch twins in `swiglu`: flat elementwise passes,
silu and its derivative in fp32, each result rounded once to the tensors' dtype."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024


@triton.jit
def _swiglu_forward_kernel(g_ptr, u_ptr, h_ptr, numel, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    silu = (g * tl.sigmoid(g)).to(h_ptr.dtype.element_ty).to(tl.float32)  # rounded, as F.silu's output is
    tl.store(h_ptr + offsets, (silu * u).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, numel, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(du_ptr + offsets, (dy * g * s).to(du_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + offsets, (dy * u * s * (1.0 + g * (1.0 - s))).to(dg_ptr.dtype.element_ty), mask=mask)


def swiglu_forward_triton(g: Tensor, u: Tensor) -> Tensor:
    """Triton twin of `swiglu_forward_torch`."""
    g, u = g.contiguous(), u.contiguous()
    h = torch.empty_like(g)
    _swiglu_forward_kernel[(triton.cdiv(g.numel(), BLOCK),)](g, u, h, g.numel(), BLOCK=BLOCK)
    return h


def swiglu_backward_triton(dy: Tensor, g: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """Triton twin of `swiglu_backward_torch`."""
    g, u = g.contiguous(), u.contiguous()
    dg, du = torch.empty_like(g), torch.empty_like(u)
    _swiglu_backward_kernel[(triton.cdiv(g.numel(), BLOCK),)](dy.contiguous(), g, u, dg, du, g.numel(), BLOCK=BLOCK)
    return dg, du
