"""Injection: the base object is kept, frozen and untouched; errors leave the model as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlora_inject import LoraConfig, LoraLinear, ModulesToSaveWrapper, TargetNotFoundError, inject
from qlora_inject.inject import adapter_names, delete_adapter

from conftest import requires
from factories import LLAMA_PROJECTIONS, Holder, load_tiny_llama, make_dense
from parity import assert_same_state, clone_state

pytestmark = requires("transformers")


@requires("bitsandbytes")
@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantizer_state_is_the_very_same_object(quant):
    model = load_tiny_llama(quant)
    before = model.model.layers[0].self_attn.q_proj
    weight = before.weight
    state = (weight.quant_state,) if quant == "nf4" else (before.state,)
    inject(model, LoraConfig(target_modules=LLAMA_PROJECTIONS))
    after = model.model.layers[0].self_attn.q_proj
    assert isinstance(after, LoraLinear)
    assert after.base_layer is before and after.base_layer.weight is weight
    assert ((after.base_layer.weight.quant_state,) if quant == "nf4" else (after.base_layer.state,)) == state
    assert (after.base_layer.weight.quant_state is state[0]) if quant == "nf4" else (after.base_layer.state is state[0])


@requires("bitsandbytes")
def test_only_adapters_train_and_base_gets_no_gradient():
    model = load_tiny_llama("nf4")
    inject(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    ids = torch.randint(0, 128, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == param.requires_grad, name


def test_bias_modes():
    model = load_tiny_llama("none")
    for module in model.modules():                                          # give the projections biases
        if isinstance(module, nn.Linear) and module.bias is None and module.out_features == 64:
            module.bias = nn.Parameter(torch.zeros(64))
    inject(model, LoraConfig(target_modules=["q_proj"], bias="lora_only"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert trainable == {f"model.layers.{i}.self_attn.q_proj.base_layer.bias" for i in range(2)}
    inject(model, LoraConfig(target_modules=["k_proj"], bias="all"), adapter_name="second")
    assert {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")} > trainable


def test_report_lists_each_wrapped_module():
    model = load_tiny_llama("none")
    report = inject(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"],
                                      rank_pattern={"down_proj": 2}))
    assert len(report) == 4
    down = next(w for w in report.wrapped if w.name.endswith("down_proj"))
    assert (down.backend, down.in_features, down.out_features, down.r, down.lora_alpha) == ("dense", 128, 64, 2, 16)
    assert down.scaling == 8.0
    assert "| model.layers.0.mlp.down_proj | dense | Linear | 128 | 64 | 2 | 16 |" in str(report)


def test_meta_device_model_gets_meta_adapters():
    with torch.device("meta"):
        model = Holder(nn.Linear(16, 8))
    inject(model, LoraConfig(r=2, target_modules=["proj"]))
    assert model.proj.lora_A["default"].weight.device.type == "meta"
    assert model.proj.lora_B["default"].weight.shape == (8, 2)


def test_existing_adapter_name_is_refused_and_model_unchanged():
    model = Holder(make_dense())
    inject(model, LoraConfig(target_modules=["proj"]))
    before = clone_state(model)
    with pytest.raises(ValueError, match=r"adapter 'default' already exists in this model \(adapters: \['default'\]\)"):
        inject(model, LoraConfig(target_modules=["proj"]), adapter_name="default")
    assert_same_state(before, clone_state(model))


@pytest.mark.parametrize(("config", "error", "message"), [
    (dict(target_modules=["q_proj", "v_prj"]), TargetNotFoundError, r"'v_prj' matches no module.*mean \['v_proj'"),
    (dict(target_modules=["q_proj", "embed_tokens"]), TypeError, r"'model\.embed_tokens' is a .*Embedding"),
    (dict(target_modules=["q_proj"], modules_to_save=["no_such_head"]), ValueError, r"modules_to_save=.*matches no"),
    (dict(target_modules=["q_proj"], layers_to_transform=[7]), ValueError, r"config selects no layer"),
])
def test_bad_targets_leave_the_model_exactly_as_it_was(config, error, message):
    model = load_tiny_llama("none")
    before = clone_state(model)
    classes = [type(m) for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(error, match=message):
        inject(model, LoraConfig(**config))
    assert_same_state(before, clone_state(model))
    assert [type(m) for m in model.modules()] == classes
    assert [p.requires_grad for p in model.parameters()] == flags


def test_bad_adapter_names():
    model = Holder(make_dense())
    for name, message in [("", "must be a non-empty string"), ("a.b", "without '.'"), ("__base__", "is reserved"),
                          ("half", "clashes with an attribute of torch modules")]:
        with pytest.raises(ValueError, match=message):
            inject(model, LoraConfig(target_modules=["proj"]), adapter_name=name)
    assert isinstance(model.proj, nn.Linear)


def test_second_adapter_is_added_inactive_and_frozen():
    model = Holder(make_dense())
    inject(model, LoraConfig(target_modules=["proj"]))
    inject(model, LoraConfig(r=2, target_modules=["proj"]), adapter_name="other")
    assert model.proj.active_adapters == ["default"]
    assert not model.proj.lora_A["other"].weight.requires_grad
    assert model.proj.lora_A["default"].weight.requires_grad
    assert adapter_names(model) == ["default", "other"]


def test_modules_to_save_trains_a_copy():
    model = load_tiny_llama("none")
    head = model.lm_head
    inject(model, LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert isinstance(model.lm_head, ModulesToSaveWrapper) and model.lm_head.original_module is head
    assert model.lm_head.modules_to_save["default"].weight.requires_grad
    assert not head.weight.requires_grad
    assert model.lm_head.modules_to_save["default"].weight is not head.weight


def test_delete_adapter_restores_the_base_module():
    base = make_dense()
    model = Holder(base)
    inject(model, LoraConfig(target_modules=["proj"]))
    delete_adapter(model, "default")
    assert model.proj is base
    with pytest.raises(ValueError, match=r"adapter 'default' is not in this model"):
        delete_adapter(model, "default")
