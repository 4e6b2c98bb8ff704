"""`LoraLinear`'s adapter contract: its tables are declared once, and adding, deleting, freezing,
saving and running an adapter go through its methods and its variant, touching no other adapter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlora_inject import LoraConfig, LoraModel, inject
from qlora_inject.adapter_io import adapter_state_dict, check_and_copy
from qlora_inject.dora import DoraVariant
from qlora_inject.lora import LoraLinear
from qlora_inject.variant import LoraVariant

from factories import IN_FEATURES, OUT_FEATURES, Holder, make_dense


def _two_adapters() -> LoraLinear:
    """A dense layer with adapter `a` (plain LoRA) and adapter `b` (DoRA)."""
    model = Holder(make_dense())
    inject(model, LoraConfig(r=4, target_modules=["proj"], init_lora_weights=False), "a")
    inject(model, LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False, use_dora=True), "b")
    return model.proj


def _tables(layer: LoraLinear) -> tuple[str, ...]:
    return (*layer.adapter_layer_names, *layer.other_module_names, *layer.other_param_names)


def test_every_per_adapter_table_is_declared():
    layer = _two_adapters()
    keyed_by_adapter = {name for name, value in {**vars(layer), **layer._modules}.items()
                        if isinstance(value, (dict, nn.ModuleDict)) and "b" in value}
    assert keyed_by_adapter == set(_tables(layer))


def test_delete_clears_every_table_and_leaves_the_other_adapter():
    layer = _two_adapters()
    a_params = [p.clone() for p in layer.adapter_parameters("a")]
    layer.delete_adapter("b")
    for table in _tables(layer):
        assert "b" not in getattr(layer, table), table
    assert layer.adapters == ["a"] and set(layer.r) == {"a"}
    for before, after in zip(a_params, layer.adapter_parameters("a"), strict=True):
        assert torch.equal(before, after)


def test_adapter_parameters_and_freezing_are_per_adapter():
    layer = _two_adapters()
    assert [p.shape for p in layer.adapter_parameters("b")] == [(2, IN_FEATURES), (OUT_FEATURES, 2),
                                                                (OUT_FEATURES,)]  # A, B, magnitude
    layer.set_requires_grad("b", True)
    layer.set_requires_grad("a", False)
    assert not any(p.requires_grad for p in layer.adapter_parameters("a"))
    assert all(p.requires_grad for p in layer.adapter_parameters("b"))


def test_state_keys_are_what_the_variant_saves_under_peft_names():
    layer = _two_adapters()
    assert layer.adapter_state_keys("a") == {"lora_A.weight": "lora_A.a.weight", "lora_B.weight": "lora_B.a.weight"}
    assert layer.adapter_state_keys("b") == {"lora_A.weight": "lora_A.b.weight", "lora_B.weight": "lora_B.b.weight",
                                             "lora_magnitude_vector": "lora_magnitude_vector.b.weight"}
    state = layer.state_dict()
    assert all(key in state for name in layer.adapters for key in layer.adapter_state_keys(name).values())


def test_the_variant_is_resolved_once_when_the_adapter_is_added():
    layer = _two_adapters()
    plain, dora = layer.variant("a"), layer.variant("b")
    assert type(plain) is LoraVariant and isinstance(dora, DoraVariant)
    assert plain.fusable and not dora.fusable and not dora.combinable
    layer.set_adapter(["a", "b"])
    x = torch.randn(3, IN_FEATURES)
    layer(x)
    layer(x)
    assert layer.variant("a") is plain and layer.variant("b") is dora
    assert "dora_base_norm_sq" not in vars(layer)                            # the variant keeps its own cache
    assert dora._base_norm_sq[0] is layer.base_layer


@pytest.mark.parametrize("adapter_name", ["0", "mlp", "proj"])
def test_an_adapter_named_like_a_module_touches_no_other(tmp_path, adapter_name):
    model = nn.Sequential(nn.ModuleDict({"mlp": Holder(make_dense())}))       # paths "0.mlp.proj..."
    lora_model = LoraModel(model, LoraConfig(r=4, target_modules=["proj"], init_lora_weights=False))
    lora_model.save_pretrained(tmp_path)
    lora_model.load_adapter(tmp_path, adapter_name)                             # not trainable: frozen alone
    layer = model[0]["mlp"].proj
    assert all(p.requires_grad for p in layer.adapter_parameters("default"))
    assert not any(p.requires_grad for p in layer.adapter_parameters(adapter_name))
    saved = adapter_state_dict(model, adapter_name)
    assert sorted(saved) == ["base_model.model.0.mlp.proj.lora_A.weight", "base_model.model.0.mlp.proj.lora_B.weight"]
    lora_model.delete_adapter(adapter_name)
    assert layer.adapters == ["default"]


class _WithHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = make_dense()
        self.head = nn.Linear(OUT_FEATURES, 8)


def test_bias_all_saves_and_loads_no_other_adapters_copy():
    # bias="all" saves every bias no adapter owns; another adapter's trained copy of a module is not one.
    model = _WithHead()
    config = LoraConfig(r=2, target_modules=["proj"], modules_to_save=["head"], bias="all")
    inject(model, config, "a")
    inject(model, config, "b")
    saved = adapter_state_dict(model, "a", "all")
    assert sorted(key.removeprefix("base_model.model.") for key in saved) == [
        "head.bias", "head.original_module.bias", "head.weight", "proj.base_layer.bias", "proj.lora_A.weight",
        "proj.lora_B.weight"]
    leaked = {**saved, "base_model.model.head.modules_to_save.b.bias": torch.zeros(8)}
    with pytest.raises(ValueError, match=r"unexpected \(1\): \['head\.modules_to_save\.b\.bias'\]"):
        check_and_copy(model, leaked, "a", "all")
