"""add_weighted_adapter: cat and svd reproduce Σ wᵢ·ΔWᵢ; linear is PEFT's one-rank combination."""

from __future__ import annotations

import pytest
import torch

from qlora_inject import LoraConfig, LoraModel

from conftest import requires
from factories import IN_FEATURES, Holder, make_bnb4, make_dense

LAYERS = [pytest.param(make_dense, id="dense"), pytest.param(make_bnb4, id="nf4", marks=requires("bitsandbytes"))]


def two_adapters(make_layer) -> LoraModel:
    model = LoraModel(Holder(make_layer()), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"],
                                                       init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=2, target_modules=["proj"], init_lora_weights=False))
    return model


@pytest.mark.parametrize("make_layer", LAYERS)
@pytest.mark.parametrize("kind", ["cat", "svd"])
def test_exact_combinations(make_layer, kind):
    model = two_adapters(make_layer)
    layer = model.model.proj
    expected = 0.7 * layer.delta_weight("default") - 0.4 * layer.delta_weight("b")
    model.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", combination_type=kind, svd_rank=6)
    torch.testing.assert_close(layer.delta_weight("mix"), expected, atol=1e-5, rtol=1e-4)
    x = torch.randn(3, IN_FEATURES)
    with torch.no_grad():
        model.set_adapter(["default", "b"])
        layer.scaling["b"] *= -0.4 / 1.0
        layer.scaling["default"] *= 0.7
        reference = model(x)
        model.set_adapter("mix")
        torch.testing.assert_close(model(x), reference, atol=1e-4, rtol=1e-4)
    assert model.peft_config["mix"].r == 6


def test_linear_is_exact_for_one_adapter_and_needs_one_rank():
    model = two_adapters(make_dense)
    layer = model.model.proj
    model.add_weighted_adapter(["default"], [0.5], "halved", combination_type="linear")
    torch.testing.assert_close(layer.delta_weight("halved"), 0.5 * layer.delta_weight("default"), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match=r"'linear' needs adapters of one rank, got ranks \[2, 4\]"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "bad", combination_type="linear")


def test_bad_requests():
    model = two_adapters(make_dense)
    with pytest.raises(ValueError, match=r"adapters \['nope'\] are not in this model"):
        model.add_weighted_adapter(["nope"], [1.0], "x")
    with pytest.raises(ValueError, match=r"1 weights for 2 adapters"):
        model.add_weighted_adapter(["default", "b"], [1.0], "x")
    with pytest.raises(ValueError, match=r"combination_type='ties' is not one of"):
        model.add_weighted_adapter(["default"], [1.0], "x", combination_type="ties")


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), "0.5", True], ids=repr)
def test_non_finite_or_non_numeric_weights_are_refused_and_nothing_is_added(weight):
    model = two_adapters(make_dense)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"weights=\[0\.5, {weight!r}\] holds {weight!r}; each weight must be a "
                                         r"finite number \(not nan, inf or a string\)"):
        model.add_weighted_adapter(["default", "b"], [0.5, weight], "mix")
    assert "mix" not in model.peft_config and "mix" not in model.model.proj.lora_A
    assert before.keys() == model.state_dict().keys()
    with pytest.raises(ValueError, match=r"svd_rank=0 must be a positive integer or None"):
        model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix", svd_rank=0)


def test_an_adapter_whose_variant_does_not_add_up_is_refused():
    model = two_adapters(make_dense)
    model.add_adapter("d", LoraConfig(r=2, target_modules=["proj"], use_dora=True))
    with pytest.raises(ValueError, match=r"adapters \{'d': 'dora'\} \(adapter: variant\) cannot be combined: their "
                                         r"update is not s·B A alone"):
        model.add_weighted_adapter(["default", "d"], [0.5, 0.5], "mix", combination_type="cat")
    assert "mix" not in model.peft_config
