"""Triton kernels for RMSNorm, beside their torch twins in `rms_norm` (same signatures, same numerics
up to fp32 summation order).

Forward: one program per row, the row held whole in registers (hidden ≤ 65,536). Backward: each
program walks a run of rows, writes their dx, and accumulates its share of dw in fp32; the shares
are summed afterwards (only when the weight wants a gradient: a LoRA model's norms are frozen).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_HIDDEN = 65536
ROW_RUNS = 1024                                                             # programs in the backward, at most


@triton.jit
def _rms_norm_forward_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    mask = offsets < cols
    x = tl.load(x_ptr + row * cols + offsets, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / cols + eps)
    tl.store(rstd_ptr + row, rstd)
    normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)          # cast back first, as Llama does
    w = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * cols + offsets, (w * normed).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_backward_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, rows, cols, rows_per_program,
                              BLOCK: tl.constexpr, WEIGHT_GRAD: tl.constexpr):
    program = tl.program_id(0)
    offsets = tl.arange(0, BLOCK)
    mask = offsets < cols
    w = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    first = program * rows_per_program
    last = tl.minimum(first + rows_per_program, rows)
    for row in range(first, last):
        base = tl.cast(row, tl.int64) * cols
        x = tl.load(x_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        n = x * rstd
        dn = dy * w
        dx = rstd * (dn - n * (tl.sum(dn * n, axis=0) / cols))
        tl.store(dx_ptr + base + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if WEIGHT_GRAD:
            dw += dy * n.to(x_ptr.dtype.element_ty).to(tl.float32)
    if WEIGHT_GRAD:
        tl.store(dw_ptr + program * cols + offsets, dw, mask=mask)


def _rows(x: Tensor) -> Tensor:
    if x.shape[-1] > MAX_HIDDEN:
        raise ValueError(f"rms_norm_forward_triton: hidden size {x.shape[-1]} is over {MAX_HIDDEN}; "
                         "use rms_norm_forward_torch")
    return x.contiguous().view(-1, x.shape[-1])


def rms_norm_forward_triton(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Triton twin of `rms_norm_forward_torch`."""
    rows = _rows(x)
    y = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(rows.shape[1])
    _rms_norm_forward_kernel[(rows.shape[0],)](rows, weight.contiguous(), y, rstd, rows.shape[1], eps,
                                               BLOCK=block, num_warps=min(max(block // 256, 1), 16))
    return y.view(x.shape), rstd.view(*x.shape[:-1], 1)


def rms_norm_backward_triton(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor,
                             weight_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Triton twin of `rms_norm_backward_torch`."""
    rows = _rows(x)
    count, cols = rows.shape
    dx = torch.empty_like(rows)
    per_program = triton.cdiv(count, ROW_RUNS)
    programs = triton.cdiv(count, per_program)
    shares = torch.empty((programs, cols) if weight_grad else (1,), dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(cols)
    _rms_norm_backward_kernel[(programs,)](dy.contiguous().view(-1, cols), rows, weight.contiguous(),
                                           rstd.contiguous().view(-1), dx, shares, count, cols, per_program,
                                           BLOCK=block, WEIGHT_GRAD=weight_grad,
                                           num_warps=min(max(block // 256, 1), 16))
    dw = shares.sum(0).to(weight.dtype) if weight_grad else None
    return dx.view(x.shape), dw
