"""PiSSA, OLoRA and LoftQ starts, on quantized bases too."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlora_inject import LoraConfig, find_backend, inject

from conftest import requires
from factories import FORMAT_LAYERS as LAYERS
from factories import IN_FEATURES, Holder, dense_weight, format_params, make_bnb4, make_dense, registered_formats

PARAMS = format_params(*registered_formats())                      # each registered format, fp4 too


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("scheme", ["pissa", "pissa_niter_4", "olora"])
@pytest.mark.parametrize("fmt", PARAMS)
def test_principal_start_keeps_the_layer_and_moves_the_weight_into_the_adapter(fmt, scheme):
    original = LAYERS[fmt][0]()
    x = torch.randn(4, IN_FEATURES)
    with torch.no_grad():
        expected = original(x).float()
    weight = find_backend(original).dequantize(original).float()
    model = Holder(LAYERS[fmt][0]())
    inject(model, LoraConfig(r=8, lora_alpha=8, target_modules=["proj"], init_lora_weights=scheme))
    layer = model.proj
    delta = layer.delta_weight("default")
    assert delta.norm() > 0.1 * weight.norm()                                 # the adapter holds a real part of W
    residual = layer.backend.dequantize(layer.base_layer).float()
    tolerance = 1e-5 if fmt == "dense" else 0.15                              # the residual was requantized
    assert relative(residual + delta, weight) < tolerance
    with torch.no_grad():
        assert relative(model(x), expected) < tolerance
    assert type(layer.base_layer) is type(original) or fmt in ("gptq", "awq")


@requires("peft")
@pytest.mark.parametrize("scheme", ["pissa", "olora"])
def test_dense_start_equals_peft(scheme):
    import peft

    ours = Holder(make_dense())
    inject(ours, LoraConfig(r=8, lora_alpha=16, target_modules=["proj"], init_lora_weights=scheme))
    theirs = Holder(make_dense())
    peft.LoraModel(theirs, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["proj"], init_lora_weights=scheme),
                   "default")
    lora_A, lora_B = theirs.proj.lora_A["default"].weight, theirs.proj.lora_B["default"].weight
    their_delta = theirs.proj.scaling["default"] * lora_B @ lora_A
    torch.testing.assert_close(ours.proj.delta_weight("default"), their_delta.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.proj.base_layer.weight, theirs.proj.base_layer.weight, atol=1e-4, rtol=1e-4)


@requires("bitsandbytes")
@pytest.mark.parametrize("iterations", [1, 3])
def test_loftq_beats_plain_quantization(iterations):
    from qlora_inject.quantize import quantize_linear

    weight = dense_weight()
    plain = quantize_linear(make_dense(), "nf4")
    plain_error = relative(find_backend(plain).dequantize(plain), weight)
    model = Holder(make_dense())
    inject(model, LoraConfig(r=16, lora_alpha=16, target_modules=["proj"], init_lora_weights="loftq",
                             loftq_config={"format": "nf4", "loftq_iter": iterations}))
    layer = model.proj
    assert type(layer.base_layer).__name__ == "Linear4bit" and layer.backend.name == "bnb-4bit"
    approximation = layer.backend.dequantize(layer.base_layer).float() + layer.delta_weight("default")
    assert relative(approximation, weight) < 0.8 * plain_error
    torch.testing.assert_close(layer.base_layer.bias.float(), make_dense().bias)


@requires("bitsandbytes")
def test_loftq_on_an_already_quantized_base_is_refused_and_changes_nothing():
    model = Holder(make_bnb4())
    base = model.proj
    with pytest.raises(ValueError, match=r"LoftQ needs the full-precision weight: inject it into the dense model"):
        inject(model, LoraConfig(target_modules=["proj"], init_lora_weights="loftq", loftq_config={"format": "nf4"}))
    assert model.proj is base and not isinstance(model.proj, nn.Identity)


def test_loading_a_pissa_adapter_does_not_rewrite_the_base(tmp_path):
    from qlora_inject import LoraModel

    from parity import assert_same_state, clone_state

    trained = LoraModel(Holder(make_dense()), LoraConfig(r=4, target_modules=["proj"], init_lora_weights="pissa"))
    trained.save_pretrained(tmp_path)
    fresh = Holder(make_dense())
    before = clone_state(fresh)
    loaded = LoraModel.from_pretrained(fresh, tmp_path)
    after = {k.replace("base_layer.", ""): v for k, v in clone_state(fresh).items() if "lora_" not in k}
    assert_same_state(before, after)
    torch.testing.assert_close(loaded.model.proj.lora_A["default"].weight, trained.model.proj.lora_A["default"].weight)
