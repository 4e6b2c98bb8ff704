"""bitsandbytes 4-bit and 8-bit: dequantization against bitsandbytes, wrapped output, PEFT parity."""

from __future__ import annotations

import pytest
import torch

from qlora_inject import find_backend

from conftest import requires
from factories import dense_weight, make_bnb4, make_bnb8
from parity import TOL, assert_dequantized_plus_lora, assert_matches_peft

pytestmark = requires("bitsandbytes")

FOUR_BIT = [
    pytest.param(qt, dq, storage, id=f"{qt}-{'dq' if dq else 'nodq'}-{str(storage).removeprefix('torch.')}")
    for qt in ("nf4", "fp4") for dq in (False, True) for storage in (torch.uint8, torch.bfloat16)
]
DTYPES = [torch.float32, torch.bfloat16]


def bnb_dequantize_4bit(layer) -> torch.Tensor:
    import bitsandbytes.functional as bnbF

    return bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


@pytest.mark.parametrize(("quant_type", "double_quant", "storage"), FOUR_BIT)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_4bit_dequantize_equals_bitsandbytes(quant_type, double_quant, storage, dtype, monkeypatch):
    from qlora_inject.kernels import dequant_cpu

    layer = make_bnb4(quant_type, double_quant, dtype, storage)
    backend = find_backend(layer)
    assert backend.name == "bnb-4bit"
    reference = bnb_dequantize_4bit(layer)
    assert torch.equal(backend.dequantize(layer), reference)              # whichever path was measured fastest
    for forced in ("numba", "torch"):                                       # ours: the CPU kernel, the twin
        monkeypatch.setenv("QLORA_INJECT_KERNEL", forced)
        ours = backend.dequantize(layer)
        assert ours.dtype == reference.dtype == dtype
        torch.testing.assert_close(ours, reference, atol=0, rtol=0)
    monkeypatch.setattr(dequant_cpu, "available", lambda: False)
    torch.testing.assert_close(backend.dequantize(layer), reference, atol=0, rtol=0)
    # And it is a 4-bit approximation of the weight it was built from, not something else.
    error = (ours.float() - dense_weight()).norm() / dense_weight().norm()
    assert error < 0.15, f"relative quantization error {error:.3f} is too large for 4 bits"


@pytest.mark.parametrize(("quant_type", "double_quant", "storage"), FOUR_BIT[::3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_4bit_wrapped_output_is_dequantized_dense_plus_lora(quant_type, double_quant, storage, dtype):
    layer = make_bnb4(quant_type, double_quant, dtype, storage)
    assert_dequantized_plus_lora(lambda: make_bnb4(quant_type, double_quant, dtype, storage),
                                 bnb_dequantize_4bit(layer), dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_4bit_matches_peft(quant_type, dtype):
    assert_matches_peft(lambda: make_bnb4(quant_type, True, dtype), dtype)


def test_4bit_compute_dtype_comes_from_the_layer():
    layer = make_bnb4(dtype=torch.bfloat16)
    assert find_backend(layer).compute_dtype(layer) == torch.bfloat16


@pytest.mark.parametrize(("quant_type", "double_quant", "storage"), FOUR_BIT[:4])
def test_4bit_requantize_round_trips(quant_type, double_quant, storage):
    layer = make_bnb4(quant_type, double_quant, torch.float32, storage)
    backend = find_backend(layer)
    dense = backend.dequantize(layer)
    again = backend.requantize(layer, dense)
    assert type(again) is type(layer)
    assert again.weight.quant_state.quant_type == quant_type
    assert again.weight.quant_state.nested == double_quant
    assert again.weight.data.dtype == storage
    # Re-quantizing a dequantized weight lands on (nearly) the same grid points.
    error = (backend.dequantize(again) - dense).abs().max()
    assert error < 1e-2 * dense.abs().max(), f"requantized weight moved by {error:.2e}"
    torch.testing.assert_close(again.bias, layer.bias)


def bnb_dequantize_8bit(layer) -> torch.Tensor:
    import bitsandbytes.functional as bnbF

    scales = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
    return bnbF.int8_vectorwise_dequant(layer.weight.data, scales)


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_8bit_dequantize_equals_bitsandbytes(threshold):
    layer = make_bnb8(threshold)
    backend = find_backend(layer)
    assert backend.name == "bnb-8bit"
    torch.testing.assert_close(backend.dequantize(layer), bnb_dequantize_8bit(layer), atol=1e-7, rtol=1e-6)
    layer(torch.randn(2, layer.in_features))                                 # bnb moves CB/SCB into .state
    torch.testing.assert_close(backend.dequantize(layer), bnb_dequantize_8bit(layer), atol=1e-7, rtol=1e-6)
    error = (backend.dequantize(layer) - dense_weight()).norm() / dense_weight().norm()
    assert error < 0.02, f"relative int8 error {error:.4f}"


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_8bit_wrapped_output_is_dequantized_dense_plus_lora(threshold, dtype):
    # LLM.int8 also quantizes the activations, so its forward is dequant-dense only to ~1 %.
    layer = make_bnb8(threshold)
    tol = {"atol": 3e-2, "rtol": 3e-2}
    assert_dequantized_plus_lora(lambda: make_bnb8(threshold), bnb_dequantize_8bit(layer), dtype, tol)


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_8bit_matches_peft(threshold, dtype):
    assert_matches_peft(lambda: make_bnb8(threshold), dtype)


def test_8bit_requantize_round_trips():
    layer = make_bnb8(6.0)
    backend = find_backend(layer)
    dense = backend.dequantize(layer)
    again = backend.requantize(layer, dense)
    assert again.weight.dtype == torch.int8
    assert again.state.threshold == 6.0
    torch.testing.assert_close(backend.dequantize(again), dense, **TOL[torch.bfloat16])


def test_unquantized_4bit_layer_gets_a_clear_error():
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(8, 4, device="meta")
    with pytest.raises(ValueError, match=r"has not been quantized yet.*\.to\('cuda'\)"):
        find_backend(layer).dequantize(layer)


@pytest.mark.parametrize("shape", [(40, 96), (64, 64), (7, 200)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_dequantize_is_faithful_when_blocks_straddle_rows(shape, quant_type):
    # Here bitsandbytes 0.50's own CPU dequantize_4bit disagrees (it mis-reads blocks that cross a
    # row end), so the oracle is the quantization error bound: each element must sit within one
    # code step of the original, scaled by its block's absmax.
    import bitsandbytes.functional as bnbF

    from qlora_inject.kernels.dequant_4bit import dequantize_4bit_torch

    weight = torch.randn(shape)
    packed, state = bnbF.quantize_4bit(weight, blocksize=64, quant_type=quant_type)
    ours = dequantize_4bit_torch(packed, state.absmax, state.code, 64, tuple(state.shape), torch.float32)
    step = state.code.sort().values.diff().max()                            # widest gap between codes
    flat = torch.nn.functional.pad(weight.view(-1), (0, (-weight.numel()) % 64)).view(-1, 64)
    bound = (flat.abs().max(dim=1).values[:, None] * step).expand(-1, 64).reshape(-1)[: weight.numel()]
    assert ((ours - weight).view(-1).abs() <= bound + 1e-6).all()
    torch.testing.assert_close(state.absmax, flat.abs().max(dim=1).values)


def test_cpu_repacking_in_eval_mode_does_not_touch_a_wrapped_base():
    """bitsandbytes repacks a 4-bit weight in place for fast CPU inference (AVX512-BF16 machines).

    A wrapped base must keep its bits in eval mode; a layer repacked before wrapping is restored.
    """
    import bitsandbytes as bnb

    from qlora_inject import LoraConfig, inject

    from factories import Holder
    from parity import assert_same_state, clone_state

    model = Holder(make_bnb4("nf4", True, out_features=64))                  # the repack needs out % 32 == 0
    model.proj.support_avx512bf16_for_cpu = True                            # as on such a CPU
    inject(model, LoraConfig(target_modules=["proj"]))
    before = clone_state(model)
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, model.proj.in_features))
    assert_same_state(before, clone_state(model))
    assert not getattr(model.proj.base_layer.weight.quant_state, "packing_format_for_cpu", False)

    if not bnb.functional.has_avx512bf16():
        pytest.skip("bitsandbytes only repacks on CPUs with AVX512-BF16")
    model = Holder(make_bnb4("nf4", False, out_features=64).eval())
    model.proj.support_avx512bf16_for_cpu = True
    with torch.no_grad():
        model(torch.randn(2, model.proj.in_features))                      # bitsandbytes repacks here
    assert model.proj.weight.quant_state.packing_format_for_cpu
    with pytest.raises(ValueError, match=r"repacked by bitsandbytes for CPU inference.*inject LoRA before"):
        inject(model, LoraConfig(target_modules=["proj"]))
    assert type(model.proj).__name__ == "Linear4bit"


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_8bit_training_forward_on_cpu_is_bitsandbytes_own_bit_for_bit(threshold, dtype):
    # bitsandbytes trains int8 layers on CPU as x·(CB·(SCB·(1/127)))ᵀ + b; the fused op computes that
    # itself (our dequantization, same rounding), and keeps LLM.int8's own forward in eval mode.
    from qlora_inject import LoraConfig, inject
    from qlora_inject.registry import base_forward_is_exact

    reference = make_bnb8(threshold).train()
    x = torch.randn(6, reference.in_features, dtype=dtype)
    expected = reference(x)                                                 # MatMul8bitFp
    holder = torch.nn.Sequential(make_bnb8(threshold))
    inject(holder, LoraConfig(r=4, target_modules=["0"]))
    layer = holder[0].train()
    assert base_forward_is_exact(layer.backend, layer.base_layer, x.device)
    dense = layer.backend.dequantize(layer.base_layer).to(dtype)
    assert torch.equal(dense, reference.state.CB.to(dtype).mul_(reference.state.SCB.unsqueeze(1).mul(1.0 / 127.0)))
    got = layer(x)                                                          # lora_B is zero: the base alone
    assert torch.equal(got, expected)
    x.requires_grad_(True)
    assert torch.equal(layer(x), expected)                                  # the fused op
    layer.eval()
    assert not base_forward_is_exact(layer.backend, layer.base_layer, x.device)
    with torch.no_grad():
        inference = layer(x)
    assert torch.equal(inference, reference.eval()(x))                     # LLM.int8, activations rounded
    assert not torch.equal(inference, expected)
