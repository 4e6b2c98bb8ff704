"""RMSNorm as one autograd op: `y = w · (x · rstd)`, `rstd = 1 / sqrt(mean(x²) + ε)` over the last dim.

Numerics follow Llama's `LlamaRMSNorm`: x is normalised in fp32, cast back to its own dtype, and
then multiplied by the weight (so a bf16 model rounds twice, as the reference does). The backward,
with `n = x · rstd` and `dn = dy · w`,

    dx = rstd · (dn − n · mean(dn · n))        dw = Σ_rows dy · n

needs only x and the per-row rstd: the op saves those two (the input's own dtype and one fp32 per
row), where autograd over the module's eager ops keeps an fp32 copy of x. On CUDA the Triton
kernels of `rms_norm_triton` run; elsewhere the torch twins below, which are their reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qlora_inject.kernels import triton_runs


def rms_norm_forward_torch(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Pure-torch forward: `(y, rstd)`, rstd of shape `x.shape[:-1] + (1,)` in fp32."""
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x32 * rstd).to(x.dtype), rstd


def rms_norm_backward_torch(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor,
                            weight_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Pure-torch backward: `(dx, dw)`, dw None unless `weight_grad`.

    Written as `dx = rstd · dn − c · x` with the per-row `c = rstd³ · mean(dn · x)`: four passes
    over the activations, where the textbook form takes seven.
    """
    x32, dn = x.float(), (dy * weight).float()
    c = torch.linalg.vecdot(dn, x32).unsqueeze(-1) * rstd.pow(3) / x.shape[-1]   # (..., 1)
    dx = torch.addcmul(dn * rstd, x32, c, value=-1)
    dw = None
    if weight_grad:
        n = (x32 * rstd).to(x.dtype)
        dw = (dy.float() * n).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    return dx.to(x.dtype), dw


class RMSNormFunction(torch.autograd.Function):
    """`rms_norm` with a hand-written backward that saves x and rstd only."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        if triton_runs(x):
            from qlora_inject.kernels.rms_norm_triton import rms_norm_forward_triton as forward
        else:
            forward = rms_norm_forward_torch
        y, rstd = forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        if triton_runs(x):
            from qlora_inject.kernels.rms_norm_triton import rms_norm_backward_triton as backward
        else:
            backward = rms_norm_backward_torch
        dx, dw = backward(dy, x, weight, rstd, ctx.needs_input_grad[1])
        return dx, dw, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama's RMSNorm of `x` (any leading shape) with `weight` of shape `(hidden,)`."""
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight of shape {tuple(weight.shape)} does not match the last dim of x "
                         f"{tuple(x.shape)}; expected a weight of shape ({x.shape[-1]},)")
    return RMSNormFunction.apply(x, weight, eps)
