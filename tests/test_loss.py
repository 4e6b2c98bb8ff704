"""causal_lm_loss: the model's own loss and gradients, chunk by chunk, without the full logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlora_inject import LoraConfig, LoraModel, causal_lm_loss, linear_cross_entropy
from qlora_inject.bench import saved_for_backward_bytes
from qlora_inject.loss import why_not_chunked

from conftest import requires
from factories import load_tiny_llama

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _ids(model, batch: int = 2, seq: int = 19, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _assert_same_loss_and_grads(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, chunk: int,
                                tol: dict, **kwargs) -> None:
    expected = model(input_ids=ids, labels=labels, **kwargs).loss
    expected.backward()
    reference = _grads(model)
    got = causal_lm_loss(model, ids, labels, chunk=chunk, **kwargs)
    got.backward()
    grads = _grads(model)
    torch.testing.assert_close(got.float(), expected.float(), **tol)
    assert reference and grads.keys() == reference.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], **tol, msg=name)


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_equals_the_models_own_loss_and_gradients_with_a_trainable_head(chunk):
    model = load_tiny_llama("none")
    ids = _ids(model)
    labels = ids.clone()
    labels[0, :6] = -100                                                    # a prompt the loss skips
    model.requires_grad_(False)
    model.lm_head.requires_grad_(True)
    model.model.norm.requires_grad_(True)
    _assert_same_loss_and_grads(model, ids, labels, chunk, {"atol": 1e-5, "rtol": 1e-4})


@requires("bitsandbytes")
def test_equals_the_models_own_loss_on_a_wrapped_nf4_model_with_an_attention_mask():
    lora = LoraModel(load_tiny_llama("nf4"), LoraConfig(r=4, target_modules=PROJECTIONS, init_lora_weights=False))
    ids = _ids(lora)
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0                                                        # right padding
    labels = ids.masked_fill(mask == 0, -100)
    _assert_same_loss_and_grads(lora, ids, labels, 5, {"atol": 1e-5, "rtol": 1e-4}, attention_mask=mask)


def test_bf16_follows_the_heads_rounding():
    model = load_tiny_llama("none").to(torch.bfloat16)
    lora = LoraModel(model, LoraConfig(r=4, target_modules=PROJECTIONS, init_lora_weights=False))
    ids = _ids(lora)
    _assert_same_loss_and_grads(lora, ids, ids, 8, {"atol": 2e-2, "rtol": 2e-2})


@requires("peft")
def test_a_peft_model_gives_its_own_loss():
    import peft

    model = peft.get_peft_model(load_tiny_llama("none"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = _ids(model)
    torch.testing.assert_close(causal_lm_loss(model, ids), model(input_ids=ids, labels=ids).loss)


def test_never_keeps_the_logits_for_backward():
    vocab, hidden, tokens = 5000, 32, 64
    head = nn.Linear(hidden, vocab, bias=False)
    h = torch.randn(tokens, hidden, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    saved = saved_for_backward_bytes(lambda: linear_cross_entropy(h, head.weight, None, targets, chunk=16))
    plain = saved_for_backward_bytes(lambda: nn.functional.cross_entropy(head(h).float(), targets))
    assert plain >= tokens * vocab * 4                                       # the logits, at least once
    assert saved <= tokens * hidden * 4 + hidden * vocab * 4 + 64            # dh, dW (the head trains), a count
    got = linear_cross_entropy(h, head.weight, None, targets, chunk=16)
    torch.testing.assert_close(got, nn.functional.cross_entropy(head(h), targets))


def test_without_grad_it_computes_the_loss_alone():
    from torch.utils.flop_counter import FlopCounterMode

    vocab, hidden, tokens = 300, 16, 40
    head = nn.Linear(hidden, vocab, bias=False)
    h = torch.randn(tokens, hidden, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))

    def flops(grad: bool) -> tuple[int, torch.Tensor]:
        with torch.set_grad_enabled(grad), FlopCounterMode(display=False) as counter:
            loss = linear_cross_entropy(h, head.weight, None, targets, chunk=16)
        return counter.get_total_flops(), loss

    (training, expected), (evaluating, got) = flops(True), flops(False)
    head_matmul = 2 * tokens * hidden * vocab
    assert evaluating == head_matmul                                         # the logits, nothing more
    assert training >= 2 * head_matmul                                       # + dh (and dW), made in the forward
    assert not got.requires_grad
    torch.testing.assert_close(got, expected.detach())


def test_bias_gradient_and_all_ignored_tokens():
    head = nn.Linear(8, 11)
    h = torch.randn(10, 8, requires_grad=True)
    targets = torch.randint(0, 11, (10,))
    targets[3] = -100
    linear_cross_entropy(h, head.weight, head.bias, targets, chunk=3).backward()
    got = (h.grad, head.weight.grad, head.bias.grad)
    h.grad = head.weight.grad = head.bias.grad = None
    nn.functional.cross_entropy(head(h), targets).backward()
    for a, b in zip(got, (h.grad, head.weight.grad, head.bias.grad), strict=True):
        torch.testing.assert_close(a, b)
    nothing = linear_cross_entropy(h, head.weight, head.bias, torch.full((10,), -100), chunk=3)
    assert nothing.item() == 0.0                                             # no token to score: 0, not NaN


def test_models_it_cannot_compute_get_a_clear_error_and_are_not_changed():
    model = load_tiny_llama("none")
    ids = _ids(model)
    model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in why_not_chunked(model)
    with pytest.raises(ValueError, match=r"final_logit_softcapping=30\.0.*model\(input_ids, labels=labels\)\.loss"):
        causal_lm_loss(model, ids)
    model.config.final_logit_softcapping = None
    lora = LoraModel(model, LoraConfig(r=4, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="LoraLinear, not a plain nn.Linear"):
        causal_lm_loss(lora, ids)
    with pytest.raises(ValueError, match="has no decoder and output head"):
        causal_lm_loss(nn.Linear(4, 4), ids)
    with pytest.raises(ValueError, match="chunk=0 must be a positive number"):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), None, torch.zeros(3, dtype=torch.long), chunk=0)
    assert all(p.grad is None for p in model.parameters())
