"""A causal-LM loss that never holds the whole (tokens × vocabulary) logits.

`model(input_ids, labels=...).loss` computes every token's logits at once and upcasts them to fp32
for the cross-entropy: at 2 × 2048 tokens and Llama-3's 128,256-token vocabulary that is 1 GiB of
bf16 logits, 2 GiB in fp32, and as much again for their gradient, more than the quantized layers
of a small model. `causal_lm_loss` runs the decoder, then the head and the cross-entropy over
chunks of tokens in one autograd op (`LinearCrossEntropy`): each chunk's logits are made, turned
into the loss and into the gradient of the loss with respect to the hidden states (and the head's
weight, when it trains), and dropped. Backward only scales what the forward kept (tokens × hidden),
so nothing is computed twice. The values and gradients are those of the model's own loss: logits
in the head's dtype, cross-entropy in fp32, the mean over the tokens whose label is not -100.

    from qlora_inject import causal_lm_loss
    loss = causal_lm_loss(lora_model, input_ids, labels=input_ids)
    loss.backward()
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100


class LinearCrossEntropy(torch.autograd.Function):
    """Σ cross_entropy(h · Wᵀ + b, y) over rows, chunk by chunk; returns the sum (fp32 scalar)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int,
                with_grads: bool) -> Tensor:
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        with torch.autocast(device, enabled=False):                          # the head's dtype, as under autocast
            head_weight = weight.to(dtype)
            head_bias = None if bias is None else bias.to(dtype)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_hidden = torch.empty_like(hidden) if with_grads else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if (
                with_grads and ctx.needs_input_grad[1]) else None
            grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if (
                with_grads and bias is not None and ctx.needs_input_grad[2]) else None
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start:start + chunk].to(dtype)
                y = targets[start:start + chunk]
                logits = F.linear(h, head_weight, head_bias).float()          # (chunk, vocab): the head's rounding
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
                if grad_hidden is None:                                       # no_grad / eval: the loss alone
                    continue
                grad_logits = logits.sub_(lse[:, None]).exp_()               # softmax, in place of the logits
                grad_logits[torch.arange(y.shape[0], device=y.device), y] -= 1.0
                grad_logits = grad_logits.to(dtype)                          # as autograd casts it back to the head's
                grad_hidden[start:start + chunk] = grad_logits @ head_weight
                if grad_weight is not None:
                    grad_weight.addmm_(grad_logits.t().float(), h.float())
                if grad_bias is not None:
                    grad_bias += grad_logits.float().sum(0)
        if grad_hidden is not None:
            ctx.save_for_backward(grad_hidden, *(g for g in (grad_weight, grad_bias) if g is not None))
        ctx.has = (grad_weight is not None, grad_bias is not None)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        grad_hidden, *rest = ctx.saved_tensors
        stored = iter(rest)
        scale = grad_total.float()
        grad_weight = next(stored).mul(scale).to(ctx.dtypes[0]) if ctx.has[0] else None
        grad_bias = next(stored).mul(scale).to(ctx.dtypes[1]) if ctx.has[1] else None
        return grad_hidden * scale.to(grad_hidden.dtype), grad_weight, grad_bias, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                         chunk: int = 1024) -> Tensor:
    """Mean cross-entropy of `hidden · weightᵀ + bias` against `targets` (rows with -100 ignored),
    without materialising more than `chunk` rows of logits."""
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be a positive number of tokens, e.g. 1024")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    keep = targets != IGNORE_INDEX
    count = keep.sum()
    if not bool(keep.all()):
        hidden, targets = hidden[keep], targets[keep]
    # needs_input_grad stays True under no_grad, so whether a backward can come is decided here: an
    # evaluation pass then costs one matmul per chunk instead of two or three.
    with_grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    total = LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk, with_grads)
    return total / count.clamp_min(1)


def causal_lm_loss(model: nn.Module, input_ids: Tensor, labels: Tensor | None = None, chunk: int = 1024, *,
                   allow_unsynchronized: bool = False, **model_kwargs) -> Tensor:
    """The loss `model(input_ids, labels=labels).loss` would give (next-token cross-entropy, labels
    shifted by one, -100 ignored), computed without the full logits.

    Under DDP, FSDP1 or FSDP2 pass the wrapper (or the FSDP2-sharded root): the loss is computed inside
    its forward, so gradients synchronize and sharded weights are gathered, as `wrapper(...).loss` would.

    Args:
        model: a transformers causal LM (`*ForCausalLM`), bare or wrapped (`LoraModel`, PEFT, and DDP/FSDP
            around them): its decoder (`get_decoder()`) must return `last_hidden_state` and its head
            (`get_output_embeddings()`) must be a plain linear layer.
        labels: defaults to `input_ids`.
        chunk: tokens per chunk of logits.
        allow_unsynchronized: With more than one process and a model no engine wraps, training would
            leave each rank's gradients its own, so it is refused; True allows it (ranks that train apart
            on purpose, or that all-reduce gradients themselves).
        model_kwargs: passed to the decoder (`attention_mask`, `position_ids`, ...).
    """
    from qlora_inject import distributed

    engine = distributed.engine_of(model)
    inner = model.module if engine in ("ddp", "fsdp1") else model
    reason = why_not_chunked(inner)
    if reason is not None:
        raise ValueError(f"causal_lm_loss cannot compute this model's loss: {reason}; use "
                         "model(input_ids, labels=labels).loss for it instead")
    if engine is None:
        _refuse_unsynchronized(inner, allow_unsynchronized)
        return _chunked_loss(inner, input_ids, labels, chunk, model_kwargs)
    return _inside_forward(model, inner, lambda: _chunked_loss(inner, input_ids, labels, chunk, model_kwargs))


def _inside_forward(wrapper: nn.Module, inner: nn.Module, compute):
    """`compute()` run as `inner`'s forward, called through `wrapper`: DDP prepares its gradient reduction,
    FSDP gathers parameters and registers its backward hooks, as for any forward."""
    saved = inner.__dict__.get("forward")
    inner.forward = lambda *args, **kwargs: compute()
    try:
        return wrapper()
    finally:
        if saved is None:
            del inner.forward
        else:
            inner.forward = saved


def _refuse_unsynchronized(model: nn.Module, allowed: bool) -> None:
    from qlora_inject.distributed import world_size

    ranks = world_size()
    if allowed or ranks == 1 or not torch.is_grad_enabled() or not any(p.requires_grad for p in model.parameters()):
        return
    raise RuntimeError(
        f"causal_lm_loss got a {type(model).__name__} that no DDP/FSDP wrapper runs, in a group of {ranks} processes: "
        "its gradients would not synchronize and the ranks would drift apart. Pass the wrapper itself "
        "(causal_lm_loss(ddp_model, ...), or the model after qlora_inject.shard), or allow_unsynchronized=True "
        "if the ranks are meant to train apart"
    )


def _chunked_loss(model: nn.Module, input_ids: Tensor, labels: Tensor | None, chunk: int, model_kwargs: dict) -> Tensor:
    head = model.get_output_embeddings()
    hidden = model.get_decoder()(input_ids=input_ids, **model_kwargs).last_hidden_state   # (batch, seq, hidden)
    labels = input_ids if labels is None else labels
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match input_ids {tuple(input_ids.shape)}")
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).to(hidden.device)   # token t predicts label t + 1
    return linear_cross_entropy(hidden, head.weight, head.bias, targets, chunk)


def why_not_chunked(model: nn.Module) -> str | None:
    """None when `causal_lm_loss` computes `model`'s own loss, else the reason it cannot.

    It needs a transformers causal LM (bare, or wrapped by `LoraModel` or PEFT, which pass
    `get_decoder()` and `get_output_embeddings()` through) whose logits are hidden · Wᵀ (+ b) of a
    plain linear head: no logit soft-capping (Gemma 2) or scaling (Cohere), no adapter on the head.
    """
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        decoder = head = None
    if decoder is None or head is None:
        return f"{type(model).__name__} has no decoder and output head (get_decoder() / get_output_embeddings())"
    if type(head) is not nn.Linear:
        return f"its output head is a {type(head).__name__}, not a plain nn.Linear"
    config = getattr(model, "config", None)
    for name in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, name, None) not in (None, 1.0):
            return f"its config sets {name}={getattr(config, name)!r}, which changes the logits"
    return None
