"""LoraModel: the seed's script unchanged but for its import, on dense, 4-bit and 8-bit Llamas."""

from __future__ import annotations

import pytest
import torch

from qlora_inject import LoraConfig, LoraModel

from conftest import requires
from factories import LLAMA_PROJECTIONS, load_tiny_llama, quant_params
from parity import assert_same_state, clone_state

pytestmark = requires("transformers")

QUANTS = quant_params("none", "nf4", "fp4", "int8")                   # loaded by transformers itself
ALL_QUANTS = quant_params()


def seed_script(model):
    """The seed's script, verbatim but for the import."""
    from qlora_inject import LoraConfig, LoraModel

    config = LoraConfig(
        r=32,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_dropout=0.05,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = LoraModel(model, config, "default")
    model.print_trainable_parameters()
    return model


@pytest.mark.parametrize("quant", QUANTS)
def test_seed_script_runs_and_counts_like_peft(quant, capsys):
    import peft

    model = seed_script(load_tiny_llama(quant))
    printed = capsys.readouterr().out
    assert printed.startswith("trainable params: ")
    theirs = peft.get_peft_model(load_tiny_llama(quant), peft.LoraConfig(
        r=32, lora_alpha=16, target_modules=LLAMA_PROJECTIONS, lora_dropout=0.05, task_type="CAUSAL_LM"))
    assert model.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert len(model.reports["default"]) == 2 * len(LLAMA_PROJECTIONS)
    assert model.config.model_type == "llama"                                # falls through to the model


@pytest.mark.parametrize("quant", ALL_QUANTS)
def test_twenty_steps_lower_the_loss_and_leave_the_base_bit_identical(quant):
    model = LoraModel(load_tiny_llama(quant), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    assert len(model.reports["default"]) == 2 * len(LLAMA_PROJECTIONS)
    frozen = {k: v for k, v in clone_state(model).items() if ".lora_" not in k}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(20):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    assert_same_state(frozen, {k: v for k, v in clone_state(model).items() if ".lora_" not in k})


def test_disable_adapter_gives_the_base_output():
    base = load_tiny_llama("none")
    ids = torch.randint(0, 128, (1, 8))
    expected = base(input_ids=ids).logits
    model = LoraModel(base, LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapted = model(input_ids=ids).logits
    assert not torch.allclose(adapted, expected)
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids).logits, expected)
    torch.testing.assert_close(model(input_ids=ids).logits, adapted)


def test_set_adapter_switches_and_combines():
    model = LoraModel(load_tiny_llama("none"), LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("other", LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    ids = torch.randint(0, 128, (1, 8))
    with model.disable_adapter():
        base = model(input_ids=ids).logits
    first = model(input_ids=ids).logits
    model.set_adapter("other")
    assert model.active_adapter == "other"
    second = model(input_ids=ids).logits
    assert not torch.allclose(first, second)
    layer = model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["other"].weight.requires_grad and not layer.lora_A["default"].weight.requires_grad
    model.set_adapter(["default", "other"])
    assert model.active_adapters == ["default", "other"]
    both = model(input_ids=ids).logits
    assert not torch.allclose(both, first) and not torch.allclose(both, second) and not torch.allclose(both, base)
    with pytest.raises(ValueError, match=r"adapter\(s\) \['nope'\] do not exist; adapters: \['default', 'other'\]"):
        model.set_adapter("nope")


def test_dropout_is_active_in_training_only():
    model = LoraModel(load_tiny_llama("none"), LoraConfig(target_modules=["q_proj"], lora_dropout=0.5,
                                                          init_lora_weights=False))
    ids = torch.randint(0, 128, (1, 8))
    model.eval()
    torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits)
    model.train()
    assert not torch.allclose(model(input_ids=ids).logits, model(input_ids=ids).logits)
