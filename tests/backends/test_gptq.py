"""GPTQ: our dequantizer against GPTQModel's, both zero-point conventions, wrapped forward, PEFT parity."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from torch import nn

from qlora_inject import LoraConfig, find_backend, inject
from qlora_inject.selfcheck import LayoutMismatchError

from conftest import requires
from factories import Holder, make_gptq
from parity import assert_dequantized_plus_lora, assert_matches_peft, assert_same_state, clone_state

pytestmark = requires("gptqmodel")

GRID = [pytest.param(b, g, s, a, id=f"{b}bit-g{g}-{'sym' if s else 'asym'}{'-act' if a else ''}")
        for b, g, s, a in itertools.product((2, 3, 4, 8), (32, 64, -1), (True, False), (False, True))]


@pytest.mark.parametrize(("bits", "group_size", "sym", "act_order"), GRID)
def test_dequantize_equals_gptqmodel(bits, group_size, sym, act_order):
    layer = make_gptq(bits, group_size, sym, act_order)
    backend = find_backend(layer)
    assert backend.name == "gptq"
    torch.testing.assert_close(backend.dequantize(layer), layer.dequantize_weight().t(), atol=0, rtol=0)


class AutoGptqStyleQuantLinear(nn.Module):
    """Buffers only, zero points stored as `zero − 1`: how auto-gptq's modules and GPTQ checkpoints hold them."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        for name in ("qweight", "qzeros", "scales", "g_idx", "bias"):
            self.register_buffer(name, getattr(source, name).clone())
        self.bits, self.group_size = source.bits, source.group_size
        self.in_features, self.out_features = source.in_features, source.out_features


@pytest.mark.parametrize(("bits", "sym"), [(2, False), (3, True), (4, False), (4, True), (8, False)])
def test_v1_zero_points_are_read_with_their_offset(bits, sym):
    from gptqmodel.utils.model import convert_gptq_v2_to_v1_format_module

    v2 = make_gptq(bits, 32, sym)
    expected = v2.dequantize_weight().t()
    v1 = make_gptq(bits, 32, sym)
    convert_gptq_v2_to_v1_format_module(v1, quantize_config=type("Q", (), {"bits": bits, "pack_dtype": torch.int32})())
    assert not torch.equal(v1.qzeros, v2.qzeros)                           # the stored zeros moved by one
    look_alike = AutoGptqStyleQuantLinear(v1)
    backend = find_backend(look_alike)
    assert backend.name == "gptq" and backend.zero_offset(look_alike) == 1
    torch.testing.assert_close(backend.dequantize(look_alike), expected, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits", [3, 4])
def test_wrapped_output_is_dequantized_dense_plus_lora(bits, dtype):
    layer = make_gptq(bits, 32, dtype=dtype)
    assert_dequantized_plus_lora(lambda: make_gptq(bits, 32, dtype=dtype), layer.dequantize_weight().t(), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_peft(dtype):
    assert_matches_peft(lambda: make_gptq(4, 32, act_order=True, dtype=dtype), dtype)


def test_requantize_round_trips():
    layer = make_gptq(4, 32, sym=False, act_order=True)
    backend = find_backend(layer)
    dense = backend.dequantize(layer)
    again = backend.requantize(layer, dense)
    assert torch.equal(again.g_idx, layer.g_idx)
    torch.testing.assert_close(backend.dequantize(again).float(), dense.float(), atol=2e-3, rtol=1e-2)


class MisreadGptq(AutoGptqStyleQuantLinear):
    """Looks like GPTQ, computes with the true weight, but its qweight columns are stored in another order."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__(source)
        self.register_buffer("true_weight", source.dequantize_weight().t().clone())
        self.qweight = self.qweight.roll(1, dims=1)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.true_weight.to(x.dtype), self.bias.to(x.dtype))


def test_a_layout_that_disagrees_with_its_forward_is_refused_and_the_model_unchanged():
    holder = Holder(MisreadGptq(make_gptq(4, 32)))
    before = clone_state(holder)
    with pytest.raises(LayoutMismatchError, match=r"layer 'proj' \(MisreadGptq, backend 'gptq'\)"):
        inject(holder, LoraConfig(target_modules=["proj"]))
    assert_same_state(before, clone_state(holder))
    assert type(holder.proj) is MisreadGptq


def test_inference_only_kernel_trains_through_the_fused_op_and_unfused_falls_back_saying_so():
    layer = make_gptq(4, 32, dtype=torch.float32)
    type(layer).SUPPORTS_TRAINING = False
    try:
        model = Holder(layer)
        inject(model, LoraConfig(target_modules=["proj"], init_lora_weights=False))
        x = torch.randn(2, 128, requires_grad=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")                                 # the fused op never calls the kernel
            fused = model(x)
        model.proj.fuse = False
        with pytest.warns(UserWarning, match=r"inference-only kernel; while training.*dequantize"):
            y = model(x)
        torch.testing.assert_close(fused, y)
        y.sum().backward()
        assert x.grad is not None and model.proj.lora_A["default"].weight.grad is not None
    finally:
        type(layer).SUPPORTS_TRAINING = True
