"""One autograd op for a frozen (quantized) linear plus its plain LoRA adapters.

    y = x · Wᵀ + b + Σ_a s_a · (drop_a(x) · A_aᵀ) · B_aᵀ,        W = dequantize()

Forward: the base weight is dequantized into a reused scratch (`kernels.workspace`), used for one
matmul and dropped (or, where measured faster, a tile of rows at a time: `dequant_matmul_tiled`);
each adapter's term is folded into that output with `addmm_` (no clone, no separate scale or add
passes). Backward: W is dequantized again (whole or in tiles) for the input gradient instead of
being kept. Saved for backward: the input, each adapter's dropout mask (bool) and its small
`h_a = drop_a(x) · A_aᵀ` (tokens × r), and the adapter weights (parameters, not copies).
A format whose forward is not `x · Wᵀ` (LLM.int8 rounds activations) passes its own forward;
only the backward is then this op's. Dropout uses `torch.native_dropout`, the kernel autograd
itself uses for `nn.Dropout`.

Three dtypes meet here, as they do in the unfused layer (and in PEFT):
- the compute dtype: the base matmul's, in both directions (bf16 for `bnb_4bit_compute_dtype=bf16`);
- the output dtype: the input's, which is what the quantized module's own forward returns;
- the LoRA dtype: the adapter terms' matmuls (by default the wider of the adapter's compute dtype
  and the output dtype).
The base output is cast to the output dtype *before* the adapter terms are added, so a small LoRA
term beside a large base output is never rounded at the compute dtype's precision: with fp32
activations and a bf16 compute dtype the term keeps fp32 precision, as in PEFT. Adapter weights
stored in another dtype are cast on the fly and their gradients returned in their own dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from qlora_inject.kernels import dequant_matmul_tiled


@dataclass(frozen=True)
class AdapterTerm:
    """The non-tensor facts of one adapter: its scale and its dropout probability."""

    scaling: float
    dropout: float = 0.0


class FusedLoraLinear(torch.autograd.Function):
    """autograd op: base matmul (re-dequantized in backward) + LoRA terms folded into its output."""

    @staticmethod
    def forward(ctx, x: Tensor, *args):
        with torch.autocast(x.device.type, enabled=False):                  # dtypes here are explicit
            return FusedLoraLinear._forward(ctx, x, *args)

    @staticmethod
    def backward(ctx, grad: Tensor):
        with torch.autocast(grad.device.type, enabled=False):
            return FusedLoraLinear._backward(ctx, grad)

    @staticmethod
    def _forward(ctx, x: Tensor, bias: Tensor | None, dequantize: Callable[[], Tensor],
                 own_forward: Callable[[Tensor], Tensor] | None, compute_dtype: torch.dtype, lora_dtype: torch.dtype,
                 terms: Sequence[AdapterTerm], training: bool, *weights: Tensor) -> Tensor:
        out_dtype = x.dtype
        flat_x = x.reshape(-1, x.shape[-1])                                   # (tokens, in), as given
        flat = flat_x.to(compute_dtype)                                       # the base matmul's input
        if own_forward is not None:                                           # the format's own numerics (bias in)
            out = own_forward(x)
            out = out.reshape(-1, out.shape[-1])
        else:                                                                 # W whole or in tiles, as measured
            rows = weights[1].shape[0] if weights else (None if bias is None else bias.shape[0])   # B: (out, r)
            shape = None if rows is None else (rows, flat.shape[1])
            out = dequant_matmul_tiled.linear(flat, dequantize, compute_dtype, bias, shape)   # (tokens, out)
        out = out.to(out_dtype)                                               # widen before any term is added
        lora_x = flat if lora_dtype == compute_dtype else flat_x.to(lora_dtype)
        hidden, masks = [], []
        for term, A, B in zip(terms, weights[0::2], weights[1::2], strict=True):
            mask = None
            dropped = lora_x
            if training and term.dropout > 0:
                dropped, mask = torch.native_dropout(lora_x, term.dropout, True)
            h = torch.mm(dropped, A.t().to(lora_dtype))                       # (tokens, r)
            _add_product(out, h, B.t().to(lora_dtype), term.scaling)
            hidden.append(h)
            masks.append(mask)
        ctx.dequantize, ctx.terms = dequantize, tuple(terms)
        ctx.compute_dtype, ctx.lora_dtype = compute_dtype, lora_dtype
        ctx.has_mask = [m is not None for m in masks]
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, *weights, *hidden, *[m for m in masks if m is not None])
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def _backward(ctx, grad: Tensor):
        count = len(ctx.terms)
        x, *rest = ctx.saved_tensors
        weights, hidden, stored_masks = rest[:2 * count], rest[2 * count:3 * count], iter(rest[3 * count:])
        masks = [next(stored_masks) if has else None for has in ctx.has_mask]
        dtype, lora_dtype = ctx.compute_dtype, ctx.lora_dtype
        flat_grad = grad.reshape(-1, grad.shape[-1])                          # (tokens, out), output dtype
        g = flat_grad.to(dtype)                                               # for the base's input gradient
        lora_g = g if lora_dtype == dtype else flat_grad.to(lora_dtype)
        flat = x.reshape(-1, x.shape[-1]).to(lora_dtype)
        needs_x = ctx.needs_input_grad[0]
        weight_grads: list[Tensor | None] = []
        input_terms = []                                                      # (g·B·s, A, mask, p) per adapter
        per_adapter = zip(ctx.terms, weights[0::2], weights[1::2], hidden, masks, strict=True)
        for i, (term, A, B, h, mask) in enumerate(per_adapter):
            need_A, need_B = ctx.needs_input_grad[8 + 2 * i], ctx.needs_input_grad[9 + 2 * i]
            gh = torch.mm(lora_g, B.to(lora_dtype)).mul_(term.scaling) if (need_A or needs_x) else None  # (tokens, r)
            grad_A = grad_B = None
            if need_A:
                dropped = flat if mask is None else flat * mask * (1.0 / (1.0 - term.dropout))
                grad_A = torch.mm(gh.t(), dropped).to(A.dtype)                # (r, in)
            if need_B:
                grad_B = torch.mm(lora_g.t(), h).mul_(term.scaling).to(B.dtype)   # (out, r)
            weight_grads += [grad_A, grad_B]
            if needs_x:
                input_terms.append((gh, A.to(lora_dtype), mask, term.dropout))
        grad_x = None
        if needs_x:
            shape = (g.shape[1], x.shape[-1])
            grad_x = dequant_matmul_tiled.grad_input(g, ctx.dequantize, dtype, shape).to(x.dtype)  # (tokens, in)
            for gh, A, mask, p in input_terms:
                if mask is None:
                    _add_product(grad_x, gh, A, 1.0)
                else:
                    grad_x.add_(torch.mm(gh, A).mul_(mask).mul_(1.0 / (1.0 - p)).to(x.dtype))
            grad_x = grad_x.view(x.shape)
        grad_bias = g.sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[1] else None
        return (grad_x, grad_bias, None, None, None, None, None, None, *weight_grads)


def _add_product(out: Tensor, left: Tensor, right: Tensor, alpha: float) -> None:
    """out += alpha · left · right, in one `addmm_` when dtypes agree, else computed then cast to out's dtype."""
    if left.dtype == out.dtype:
        out.addmm_(left, right, alpha=alpha)
    else:
        out.add_(torch.mm(left, right).to(out.dtype), alpha=alpha)


def lora_dtype_for(compute_dtype: torch.dtype, x: Tensor) -> torch.dtype:
    """The dtype LoRA terms run in by default: the wider of the adapters' compute dtype and the input's.

    Under autocast the autocast dtype, as every other matmul there.
    """
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return torch.promote_types(compute_dtype, x.dtype)


def fused_lora_linear(x: Tensor, bias: Tensor | None, dequantize: Callable[[], Tensor], compute_dtype: torch.dtype,
                      adapters: Sequence[tuple[Tensor, Tensor, AdapterTerm]], training: bool,
                      own_forward: Callable[[Tensor], Tensor] | None = None,
                      lora_dtype: torch.dtype | None = None) -> Tensor:
    """`x · Wᵀ + b + Σ s·B·A·drop(x)` as one op; `adapters` holds (A (r, in), B (out, r), term) triples.

    The base matmul runs in `compute_dtype`, the adapter terms in `lora_dtype` (default:
    `lora_dtype_for(compute_dtype, x)`), and the sum is made in `x`'s dtype, the output's.
    `own_forward`, when given, computes the base output instead of `x · dequantize()ᵀ + b` (formats
    whose forward rounds, like LLM.int8); the backward still uses the dequantized weight.
    """
    weights = [t for A, B, _ in adapters for t in (A, B)]
    lora_dtype = lora_dtype or lora_dtype_for(compute_dtype, x)
    return FusedLoraLinear.apply(x, bias, dequantize, own_forward, compute_dtype, lora_dtype,
                                 [term for *_, term in adapters], training, *weights)
