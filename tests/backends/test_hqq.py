"""HQQ: our dequantizer against hqq's own `dequantize()`, the wrapped forward, PEFT parity."""

from __future__ import annotations

import pytest
import torch

from qlora_inject import LoraConfig, find_backend, inject

from conftest import requires
from factories import dense_weight, make_dense, make_hqq
from parity import assert_dequantized_plus_lora, assert_matches_peft

pytestmark = requires("hqq")

GRID = [pytest.param(nbits, group, axis, id=f"{nbits}bit-g{group}-axis{axis}")
        for nbits in (1, 2, 3, 4, 8) for group in (32, 64, 128) for axis in (0, 1)]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize(("nbits", "group_size", "axis"), GRID)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_dequantize_equals_hqq(nbits, group_size, axis, dtype):
    layer = make_hqq(nbits, group_size, axis, dtype)
    backend = find_backend(layer)
    assert backend.name == "hqq"
    ours = backend.dequantize(layer)
    reference = layer.dequantize()
    assert ours.dtype == reference.dtype == dtype
    torch.testing.assert_close(ours, reference, atol=0, rtol=0)


@pytest.mark.parametrize("nbits", [2, 4])
def test_quantized_meta_data_is_read(nbits):
    """Older hqq checkpoints quantize zero and scale themselves (meta_zero / meta_scale)."""
    from hqq.core.quantize import HQQLinear

    layer = HQQLinear(None, {"offload_meta": False}, compute_dtype=torch.bfloat16, device="cpu", initialize=False)
    layer.quantize(dense_weight().to(torch.bfloat16),
                   weight_quant_params=dict(nbits=nbits, channel_wise=True, group_size=32, optimize=False, axis=1),
                   scale_quant_params=dict(nbits=8, channel_wise=True, group_size=16, optimize=False),
                   zero_quant_params=dict(nbits=8, channel_wise=False, group_size=None, optimize=False))
    assert layer.meta["quant_zero"] and layer.meta["quant_scale"] and "zero_q" in layer.meta
    torch.testing.assert_close(find_backend(layer).dequantize(layer), layer.dequantize(), atol=0, rtol=0)


def test_offloaded_meta_layout_is_read():
    """`offload_meta` stacks zero and scale into `zero_scale` (it pins memory, so needs CUDA to build)."""
    layer = make_hqq(4, 64, 1)
    meta = layer.meta
    meta["zero_scale"] = torch.stack((meta.pop("zero"), meta.pop("scale")))
    torch.testing.assert_close(find_backend(layer).dequantize(layer), layer.dequantize(), atol=0, rtol=0)
    assert "zero_scale" in layer.meta and "zero" not in layer.meta                  # hqq cleans up after itself


@pytest.mark.parametrize("nbits", [3, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_wrapped_output_is_dequantized_dense_plus_lora(nbits, dtype):
    layer = make_hqq(nbits, 64, 1, dtype)
    assert_dequantized_plus_lora(lambda: make_hqq(nbits, 64, 1, dtype), layer.dequantize(), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_peft(dtype):
    assert_matches_peft(lambda: make_hqq(4, 64, 1, dtype), dtype)


def test_requantize_round_trips():
    layer = make_hqq(4, 64, 1, torch.bfloat16)
    backend = find_backend(layer)
    dense = backend.dequantize(layer)
    again = backend.requantize(layer, dense)
    assert type(again) is type(layer) and again.meta["nbits"] == 4 and again.meta["group_size"] == 64
    error = (backend.dequantize(again).float() - dense.float()).norm() / dense.float().norm()
    assert error < 0.02, f"requantized weight moved by {error:.3f} (relative)"
    torch.testing.assert_close(again.bias, layer.bias)


def test_all_linear_finds_hqq_layers():
    model = torch.nn.ModuleDict({"q": make_hqq(), "d": make_dense()})
    report = inject(model, LoraConfig(target_modules="all-linear"))
    assert report.backends() == {"hqq": 1, "dense": 1}
