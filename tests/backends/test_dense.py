"""Dense layers: nn.Linear and transformers' Conv1D (weight stored as (in, out))."""

from __future__ import annotations

import warnings

import pytest
import torch

from qlora_inject import LoraConfig, find_backend, inject

from conftest import requires
from factories import IN_FEATURES, OUT_FEATURES, Holder, dense_weight, make_dense
from parity import assert_dequantized_plus_lora, assert_matches_peft

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_output_is_dense_plus_lora(dtype):
    assert_dequantized_plus_lora(lambda: make_dense(dtype), dense_weight().to(dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_matches_peft(dtype):
    assert_matches_peft(lambda: make_dense(dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rslora_and_dropout_off_match_peft(dtype):
    assert_matches_peft(lambda: make_dense(dtype), dtype, use_rslora=True, r=8, lora_alpha=3)


def make_conv1d():
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(OUT_FEATURES, IN_FEATURES)
    with torch.no_grad():
        layer.weight.copy_(dense_weight().t())
    return layer


@requires("transformers")
def test_conv1d_is_read_transposed():
    layer = make_conv1d()
    backend = find_backend(layer)
    assert backend.name == "dense"
    assert backend.features(layer) == (IN_FEATURES, OUT_FEATURES)
    torch.testing.assert_close(backend.dequantize(layer), dense_weight())
    assert_dequantized_plus_lora(make_conv1d, dense_weight(), torch.float32)


@requires("transformers")
def test_conv1d_requantize_keeps_layout():
    layer = make_conv1d()
    backend = find_backend(layer)
    again = backend.requantize(layer, dense_weight() * 2)
    assert type(again) is type(layer)
    torch.testing.assert_close(backend.dequantize(again), dense_weight() * 2)


def test_requantize_refuses_a_wrong_shape():
    layer = make_dense()
    with pytest.raises(ValueError, match=r"\(3, 3\) does not fit a 128->64 layer, which needs \(64, 128\)"):
        find_backend(layer).requantize(layer, torch.zeros(3, 3))


def test_compute_dtype_setting_is_honoured():
    model = Holder(make_dense(torch.float32))
    inject(model, LoraConfig(target_modules=["proj"], compute_dtype="bfloat16", init_lora_weights=False))
    assert model.proj.lora_compute_dtype["default"] == torch.bfloat16
    assert model.proj.lora_A["default"].weight.dtype == torch.float32       # stored in fp32
    x = torch.randn(4, IN_FEATURES)
    y = model(x)
    assert y.dtype == torch.float32
    # The adapter path ran in bf16: it differs from an fp32 adapter path, by bf16 rounding only.
    with torch.no_grad():
        exact = make_dense()(x) + model.proj.scaling["default"] * (
            x @ model.proj.lora_A["default"].weight.t() @ model.proj.lora_B["default"].weight.t())
    assert not torch.equal(y, exact)
    torch.testing.assert_close(y, exact, atol=5e-2, rtol=2e-2)


@requires("transformers")
def test_fan_in_fan_out_follows_the_layer_with_a_warning():
    model = Holder(make_conv1d())
    with pytest.warns(UserWarning, match=r"fan_in_fan_out=False but 1 targeted layer\(s\), e\.g\. 'proj'.*\(in, out\)"):
        inject(model, LoraConfig(target_modules=["proj"]))
    dense = Holder(make_dense())
    with pytest.warns(UserWarning, match=r"fan_in_fan_out=True but .* store their weight as \(out, in\)"):
        inject(dense, LoraConfig(target_modules=["proj"], fan_in_fan_out=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inject(Holder(make_conv1d()), LoraConfig(target_modules=["proj"], fan_in_fan_out=True))
