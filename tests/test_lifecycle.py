"""The adapter lifecycle after a merge (unload, delete, merge_and_unload), and facades that must not stack."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qlora_inject import LoraConfig, LoraModel, inject

from conftest import requires
from factories import FORMAT_LAYERS, IN_FEATURES, Holder, format_params, make_awq, make_bnb4, make_dense
from parity import assert_same_state, clone_state

EVERY_FORMAT = format_params(*FORMAT_LAYERS)


def two_adapters(fmt: str) -> tuple[LoraModel, nn.Module]:
    """The format's layer with random adapters "default" and "other"; returns the model and the original base."""
    torch.manual_seed(11)
    layer = FORMAT_LAYERS[fmt][0]()
    config = {"target_modules": ["proj"], "init_lora_weights": False}
    model = LoraModel(Holder(layer), LoraConfig(r=4, lora_alpha=4, **config))
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=8, **config))
    with torch.no_grad():
        for name in ("default", "other"):
            model.model.proj.lora_B[name].weight.mul_(0.1)              # updates of realistic size
    return model, layer


@pytest.mark.parametrize("fmt", EVERY_FORMAT)
def test_unload_after_merge_gives_back_the_original_base_bits(fmt):
    model, original = two_adapters(fmt)
    before = clone_state(original)
    model.merge_adapter(["default", "other"])
    assert model.model.proj.base_layer is not original                   # merged: a requantized copy serves
    unloaded = model.unload()
    assert unloaded.proj is original
    assert_same_state(before, clone_state(unloaded.proj))


@pytest.mark.parametrize("fmt", EVERY_FORMAT)
def test_deleting_a_merged_adapter_unmerges_it_and_keeps_the_others_merged(fmt):
    model, original = two_adapters(fmt)
    before = clone_state(original)
    model.merge_adapter(["default", "other"])
    model.delete_adapter("default")
    layer = model.model.proj
    assert layer.merged_adapters == ["other"] and layer.unmerged_base is original
    only_other, _ = two_adapters(fmt)                                    # the same "other", merged alone
    only_other.merge_adapter(["other"])
    assert_same_state(clone_state(only_other.model.proj.base_layer), clone_state(layer.base_layer))
    model.delete_adapter("other")                                       # the last one: the original comes back
    assert model.model.proj is original
    assert_same_state(before, clone_state(original))


@pytest.mark.parametrize("fmt", format_params("dense", "nf4", "hqq", "gptq"))
def test_dense_merge_and_unload_keeps_an_earlier_merge_of_an_inactive_adapter(fmt):
    x = torch.randn(3, IN_FEATURES)
    reference, _ = two_adapters(fmt)
    reference.set_adapter(["default", "other"])
    with torch.no_grad():
        expected = reference(x)
    model, _ = two_adapters(fmt)
    model.merge_adapter(["other"])                                      # merged, though "default" is the active one
    dense = model.merge_and_unload(dequantize=True, dtype=torch.float32)
    with torch.no_grad():
        assert ((dense(x) - expected).norm() / expected.norm()).item() < 1e-4


def test_merge_error_is_measured_without_dropout_and_modes_are_restored():
    torch.manual_seed(0)
    model = LoraModel(Holder(make_dense()), LoraConfig(r=4, target_modules=["proj"], lora_dropout=0.5,
                                                       init_lora_weights=False))
    model.train()
    result = model.merge_adapter()["proj"]
    assert result.relative_error < 1e-6, result                          # dense merges exactly
    layer = model.model.proj
    assert layer.training and layer.lora_dropout["default"].training and layer.active_adapters == ["default"]


def test_a_lora_model_is_not_wrapped_again():
    model = LoraModel(Holder(make_dense()), LoraConfig(r=2, target_modules=["proj"]))
    before = clone_state(model)
    with pytest.raises(ValueError, match=r"model is already a LoraModel \(adapters: \['default'\]\); add the adapter "
                                         r"to it with model\.add_adapter\('x', config\)"):
        LoraModel(model, LoraConfig(r=2, target_modules=["proj"]), "x")
    with pytest.raises(ValueError, match=r"model already holds LoRA adapters \['default'\] .* call "
                                         r"add_adapter\('x', config\) on the LoraModel that owns it"):
        LoraModel(model.model, LoraConfig(r=2, target_modules=["proj"]), "x")
    assert_same_state(before, clone_state(model))
    assert list(model.peft_config) == ["default"] and list(model.model.proj.lora_A) == ["default"]
    model.set_adapter("default")


def test_a_model_given_adapters_by_inject_is_not_wrapped():
    model = Holder(make_dense())
    inject(model, LoraConfig(r=2, target_modules=["proj"]), "a")
    with pytest.raises(ValueError, match=r"model already holds LoRA adapters \['a'\]"):
        LoraModel(model, LoraConfig(r=2, target_modules=["proj"]))
    assert list(model.proj.lora_A) == ["a"]


@requires("bitsandbytes")
def test_modules_to_save_naming_a_4bit_layer_is_refused_and_the_model_is_unchanged():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.v_proj = make_bnb4(), make_dense()

    model = Two()
    before = clone_state(model)
    with pytest.raises(ValueError, match=r"modules_to_save=\['q_proj'\] names 'q_proj', a bnb-4bit quantized layer "
                                         r"\(Linear4bit\), which cannot be trained in full .* put it in "
                                         r"target_modules to train it with LoRA"):
        LoraModel(model, LoraConfig(target_modules=["v_proj"], modules_to_save=["q_proj"]))
    assert type(model.v_proj) is nn.Linear and type(model.q_proj).__name__ == "Linear4bit"
    assert_same_state(before, clone_state(model))


@requires("gptqmodel")
@pytest.mark.parametrize(("scales", "inputs"), [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                                 (torch.bfloat16, torch.bfloat16)], ids=str)
def test_gptqmodel_awq_without_adapters_is_the_modules_own_forward_within_the_declared_tolerance(scales, inputs):
    from qlora_inject.registry import declared_forward_rtol

    layer = make_awq(4, 32, dtype=scales)
    own = copy.deepcopy(layer)                                  # its forward rewrites its scales: run a copy
    model = LoraModel(Holder(layer), LoraConfig(r=4, target_modules=["proj"], init_lora_weights=False))
    x = torch.randn(3, 5, IN_FEATURES, dtype=inputs)
    with torch.no_grad(), model.disable_adapter():
        ours = model(x).float()
    with torch.no_grad():
        theirs = own(x).float()
    rtol = declared_forward_rtol(model.model.proj.backend, layer, inputs)
    assert 0 < rtol <= 2 ** -7
    assert ((ours - theirs).norm() / theirs.norm()).item() <= rtol
    assert layer.scales.dtype == scales


def test_inject_on_a_lora_model_is_refused_pointing_to_add_adapter():
    model = LoraModel(Holder(make_dense()), LoraConfig(r=2, target_modules=["proj"]))
    with pytest.raises(ValueError, match=r"model is a LoraModel; add the adapter with model\.add_adapter\("):
        inject(model, LoraConfig(r=2, target_modules=["proj"]), "x")
    assert list(model.model.proj.lora_A) == ["default"]
