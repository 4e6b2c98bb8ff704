"""DoRA on every format: PEFT's outputs and gradients where PEFT has the format, and its invariants."""

from __future__ import annotations

import pytest
import torch

from qlora_inject import LoraConfig, inject
from qlora_inject.dora import DoraVariant

from factories import FORMAT_LAYERS as LAYERS
from factories import IN_FEATURES, Holder, format_params, make_dense, registered_formats
from parity import TOL, assert_matches_peft

PARAMS = format_params(*registered_formats())                      # each registered format, fp4 too


@pytest.mark.parametrize("fmt", format_params("dense", "nf4", "int8", "hqq"))   # PEFT refuses DoRA on GPTQ, AWQ
def test_dora_matches_peft(fmt):
    # int8's base output rounds activations, which enter DoRA's norm through W·Aᵀ; fp16-level tolerance.
    tol = TOL[torch.float16] if fmt == "int8" else None
    assert_matches_peft(LAYERS[fmt][0], torch.float32, tol=tol, use_dora=True)


@pytest.mark.parametrize("fmt", PARAMS)
def test_dora_output_is_the_dora_formula_on_the_dequantized_weight(fmt):
    model = Holder(LAYERS[fmt][0]())
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], use_dora=True, init_lora_weights=False))
    layer = model.proj
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(1.1)               # move m off its initial value
    x = torch.randn(2, 5, IN_FEATURES)
    weight = layer.backend.dequantize(layer.base_layer).float() + layer.delta_weight("default")
    scale = layer.lora_magnitude_vector["default"].weight / torch.linalg.vector_norm(weight, dim=1)
    bias = layer.base_layer.bias
    expected = (x @ weight.t()) * scale + (0 if bias is None else bias.float())
    tolerance = 3e-2 if fmt == "int8" else 1e-4                               # LLM.int8 rounds activations
    torch.testing.assert_close(model(x).float(), expected.detach(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("fmt", PARAMS)
def test_row_norm_without_dequantizing_equals_the_direct_norm(fmt):
    model = Holder(LAYERS[fmt][0]())
    inject(model, LoraConfig(r=4, target_modules=["proj"], use_dora=True, init_lora_weights=False))
    layer = model.proj
    weight = layer.backend.dequantize(layer.base_layer).float() + layer.delta_weight("default")
    direct = torch.linalg.vector_norm(weight, dim=1)
    variant = layer.variant("default")
    assert isinstance(variant, DoraVariant)
    torch.testing.assert_close(variant.row_norm(layer, "default"), direct, atol=1e-4, rtol=1e-4)


def test_dora_starts_as_the_base_and_trains_its_magnitude():
    model = Holder(make_dense())
    x = torch.randn(3, IN_FEATURES)
    expected = make_dense()(x)
    inject(model, LoraConfig(r=4, target_modules=["proj"], use_dora=True))
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)        # B = 0 and m = ‖W‖
    model(x).square().sum().backward()
    assert model.proj.lora_magnitude_vector["default"].weight.grad is not None
    assert model.proj.lora_B["default"].weight.grad.abs().sum() > 0


def test_dora_with_dropout_runs_and_differs_from_eval():
    model = Holder(make_dense())
    inject(model, LoraConfig(r=4, target_modules=["proj"], use_dora=True, lora_dropout=0.3, init_lora_weights=False))
    x = torch.randn(3, IN_FEATURES)
    model.train()
    train_out = model(x)
    model.eval()
    assert not torch.allclose(train_out, model(x))
