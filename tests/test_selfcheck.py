"""The layout self-check: a layer whose dequantized weight disagrees with its forward is refused."""

from __future__ import annotations

import pytest
import torch

from qlora_inject import LoraConfig, inject
from qlora_inject.registry import find_backend
from qlora_inject.selfcheck import LayoutMismatchError, verify_layout

from conftest import requires
from factories import Holder, make_dense
from parity import assert_same_state, clone_state


class LyingLinear(torch.nn.Linear):
    """Its forward uses a transposed-and-shuffled weight: what a misread packing looks like."""

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight.flip(0), self.bias)


def test_a_layer_whose_forward_disagrees_is_refused_and_the_model_is_unchanged():
    model = torch.nn.ModuleDict({"good": make_dense(), "bad": LyingLinear(128, 48)})
    before = clone_state(model)
    with pytest.raises(LayoutMismatchError, match=r"layer 'bad' \(LyingLinear, backend 'dense'\): .* disagree by"):
        inject(model, LoraConfig(target_modules="all-linear"))
    assert_same_state(before, clone_state(model))
    assert type(model["good"]) is torch.nn.Linear and type(model["bad"]) is LyingLinear


@requires("bitsandbytes")
def test_bitsandbytes_cpu_blocks_straddling_rows_are_caught():
    """bitsandbytes 0.50's CPU 4-bit forward is wrong when in_features % blocksize != 0."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(96, 40, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    backend = find_backend(layer)
    if backend.name != "bnb-4bit":
        pytest.skip("not dispatched as bnb-4bit")
    try:
        error = verify_layout(backend, layer, "proj")
    except LayoutMismatchError as err:
        assert "in_features is not a multiple of the" in str(err)
    else:                                                                    # a fixed bitsandbytes
        assert error < 0.1


def test_clean_layers_pass_with_small_error():
    layer = make_dense()
    assert verify_layout(find_backend(layer), layer, "proj") < 1e-5
    inject(Holder(make_dense()), LoraConfig(target_modules=["proj"]))
