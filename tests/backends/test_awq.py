"""AWQ: GPTQModel's AWQ kernel and AutoAWQ's GEMM/GEMV modules, against the libraries' own unpacking."""

from __future__ import annotations

import itertools

import pytest
import torch

from qlora_inject import find_backend

from conftest import requires
from factories import autoawq_quantized, make_autoawq, make_awq
from parity import TOL, assert_dequantized_plus_lora, assert_matches_peft


def gptqmodel_dequantize(layer) -> torch.Tensor:
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    return dequantize_gemm(layer.qweight, layer.qzeros, layer.scales, layer.bits, layer.group_size).t()


@requires("gptqmodel")
@pytest.mark.parametrize(("bits", "group_size"), list(itertools.product((2, 3, 4, 8), (32, 64, -1))))
def test_gptqmodel_awq_dequantize_equals_gptqmodel(bits, group_size):
    layer = make_awq(bits, group_size)
    backend = find_backend(layer)
    assert backend.name == "awq"
    torch.testing.assert_close(backend.dequantize(layer), gptqmodel_dequantize(layer), atol=0, rtol=0)


@requires("awq")
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_autoawq_gemm_dequantize_equals_autoawq(group_size):
    from awq.utils.packing_utils import dequantize_gemm

    layer = make_autoawq("gemm", group_size)
    backend = find_backend(layer)
    assert backend.name == "awq"
    reference = dequantize_gemm(layer.qweight, layer.qzeros, layer.scales, 4, group_size).t()
    torch.testing.assert_close(backend.dequantize(layer), reference, atol=0, rtol=0)


@requires("awq")
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_autoawq_gemv_dequantize_equals_what_autoawq_packed(group_size):
    """AutoAWQ has no CPU unpacker for GEMV; the oracle is the grid weight its from_linear packed."""
    layer = make_autoawq("gemv", group_size)
    backend = find_backend(layer)
    assert backend.name == "awq"
    _, _, grid = autoawq_quantized(group_size)
    torch.testing.assert_close(backend.dequantize(layer).float(), grid, atol=1e-3, rtol=1e-3)


@requires("gptqmodel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gptqmodel_awq_wrapped_output_and_peft_parity(dtype):
    layer = make_awq(4, 32, dtype=dtype)
    assert_dequantized_plus_lora(lambda: make_awq(4, 32, dtype=dtype), gptqmodel_dequantize(layer), dtype)
    # GPTQModel's AWQ kernel (PEFT's base) computes an fp32 input in fp16; this library keeps fp32.
    tol = TOL[torch.float16] if dtype == torch.float32 else None
    assert_matches_peft(lambda: make_awq(4, 32, dtype=dtype), dtype, tol=tol)


@requires("gptqmodel")
def test_gptqmodel_awq_base_keeps_its_bits_under_a_bf16_input():
    """GPTQModel's AWQ kernel rewrites its own scales to the input dtype; a wrapped base must not."""
    from qlora_inject import LoraConfig, inject

    from factories import Holder

    model = Holder(make_awq(4, 32, dtype=torch.float16))
    inject(model, LoraConfig(target_modules=["proj"]))
    model(torch.randn(2, 128, dtype=torch.bfloat16)).sum().backward()
    assert model.proj.base_layer.scales.dtype == torch.float16


@requires("awq")
@pytest.mark.parametrize("layout", ["gemm", "gemv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_autoawq_wrapped_output_trains_on_cpu(layout, dtype):
    """AutoAWQ's own modules cannot run backward on a CPU; wrapped, they train (PEFT refuses them)."""
    layer = make_autoawq(layout, 32)
    assert_dequantized_plus_lora(lambda: make_autoawq(layout, 32), find_backend(layer).dequantize(layer), dtype,
                                 TOL[dtype] if dtype != torch.float32 else {"atol": 2e-3, "rtol": 2e-3})
