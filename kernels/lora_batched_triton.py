"""Triton shrink/expand for mixed-adapter batches, beside the torch twin `lora_batched.lora_gathered_torch`.

Token t uses adapter `index[t]` (−1: none). `_lora_shrink_kernel` computes h[t] = s[i]·A[i] x[t]
(one program per token and rank tile, looping over the input), `_lora_expand_kernel` computes
delta[t] = B[i] h[t] (one program per token and output tile). No factor is gathered into memory:
each program reads its adapter's rows in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_R = 16
BLOCK_K = 64
BLOCK_OUT = 64


@triton.jit
def _lora_shrink_kernel(x_ptr, a_ptr, scaling_ptr, index_ptr, h_ptr, in_features, rank,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    token = tl.program_id(0)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    adapter = tl.load(index_ptr + token)
    chosen = tl.maximum(adapter, 0)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for start in range(0, in_features, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + token * in_features + k, mask=k < in_features, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + chosen * rank * in_features + r[:, None] * in_features + k[None, :],
                    mask=(r[:, None] < rank) & (k[None, :] < in_features), other=0.0).to(tl.float32)
        acc += tl.sum(a * x[None, :], axis=1)
    scale = tl.where(adapter >= 0, tl.load(scaling_ptr + chosen).to(tl.float32), 0.0)
    tl.store(h_ptr + token * rank + r, acc * scale, mask=r < rank)


@triton.jit
def _lora_expand_kernel(h_ptr, b_ptr, index_ptr, out_ptr, out_features, rank,
                        BLOCK_OUT: tl.constexpr, BLOCK_R: tl.constexpr):
    token = tl.program_id(0)
    o = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    chosen = tl.maximum(tl.load(index_ptr + token), 0)
    acc = tl.zeros((BLOCK_OUT,), dtype=tl.float32)
    for start in range(0, rank, BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)
        h = tl.load(h_ptr + token * rank + r, mask=r < rank, other=0.0)
        b = tl.load(b_ptr + chosen * out_features * rank + o[:, None] * rank + r[None, :],
                    mask=(o[:, None] < out_features) & (r[None, :] < rank), other=0.0).to(tl.float32)
        acc += tl.sum(b * h[None, :], axis=1)
    tl.store(out_ptr + token * out_features + o, acc.to(out_ptr.dtype.element_ty), mask=o < out_features)


def lora_gathered_triton(x: Tensor, A: Tensor, B: Tensor, scaling: Tensor, index: Tensor) -> Tensor:
    """Triton twin of `lora_gathered_torch`: the per-token LoRA update, (tokens, out), in `x.dtype`."""
    tokens, in_features = x.shape
    adapters, rank, a_in = A.shape
    if a_in != in_features or B.shape[0] != adapters or B.shape[2] != rank or index.shape != (tokens,):
        raise ValueError(f"shapes do not fit: x {tuple(x.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}, "
                         f"index {tuple(index.shape)}; expected A (n, r, in), B (n, out, r), index (tokens,)")
    out_features = B.shape[1]
    hidden = torch.empty(tokens, rank, dtype=torch.float32, device=x.device)
    out = torch.empty(tokens, out_features, dtype=x.dtype, device=x.device)
    index = index.to(torch.int32).contiguous()
    _lora_shrink_kernel[(tokens, triton.cdiv(rank, BLOCK_R))](x.contiguous(), A.contiguous(), scaling.contiguous(),
                                                              index, hidden, in_features, rank,
                                                              BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K)
    _lora_expand_kernel[(tokens, triton.cdiv(out_features, BLOCK_OUT))](hidden, B.contiguous(), index, out,
                                                                        out_features, rank,
                                                                        BLOCK_OUT=BLOCK_OUT, BLOCK_R=BLOCK_R)
    return out
