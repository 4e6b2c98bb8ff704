"""Pure-torch kernels: the re-dequantizing linear keeps no weight for backward and has exact gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qlora_inject.bench import saved_for_backward_bytes
from qlora_inject.kernels.dequant_matmul import dequantized_linear

from conftest import requires_cuda
from kernel_check import run_kernel_check


def test_gradients_equal_a_plain_linear_and_no_weight_is_saved():
    weight = torch.randn(64, 32)
    bias = torch.randn(64, requires_grad=True)
    calls = []

    def dequantize():
        calls.append(1)
        return weight * 1.0                                                   # a fresh tensor, as a dequantizer makes

    x = torch.randn(5, 7, 32, requires_grad=True)
    out = dequantized_linear(x, dequantize, bias)
    reference_x = x.detach().clone().requires_grad_(True)
    reference_bias = bias.detach().clone().requires_grad_(True)
    reference = F.linear(reference_x, weight, reference_bias)
    torch.testing.assert_close(out, reference)
    grad = torch.randn_like(out)
    out.backward(grad)
    reference.backward(grad)
    torch.testing.assert_close(x.grad, reference_x.grad)
    torch.testing.assert_close(bias.grad, reference_bias.grad)
    assert len(calls) == 2                                                    # once forward, once backward
    kept = saved_for_backward_bytes(lambda: dequantized_linear(x, dequantize, None))
    assert kept < weight.numel() * weight.element_size()


def test_bf16_input():
    weight = torch.randn(16, 8)
    x = torch.randn(3, 8, dtype=torch.bfloat16, requires_grad=True)
    out = dequantized_linear(x, lambda: weight.clone(), None)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16


def test_gathered_multi_adapter_update_equals_the_loop_and_the_math():
    from qlora_inject.kernels.lora_batched import lora_gathered_torch, lora_looped, stack_adapters

    pairs = [(torch.randn(r, 24), torch.randn(40, r)) for r in (2, 4, 8)]
    A, B = stack_adapters(pairs)
    assert A.shape == (3, 8, 24) and B.shape == (3, 40, 8)
    scaling = torch.tensor([0.5, 2.0, 1.0])
    x = torch.randn(9, 24)
    index = torch.tensor([0, 2, -1, 1, 1, 0, -1, 2, 2])
    gathered = lora_gathered_torch(x, A, B, scaling, index)
    torch.testing.assert_close(gathered, lora_looped(x, A, B, scaling, index))
    for t, i in enumerate(index.tolist()):
        expected = torch.zeros(40) if i < 0 else scaling[i] * (pairs[i][1] @ (pairs[i][0] @ x[t]))
        torch.testing.assert_close(gathered[t], expected, atol=1e-4, rtol=1e-4)


TRITON_CHECK = r"""
import os
import torch
D = os.environ.get("QLORA_INJECT_KERNEL_DEVICE", "cpu")
from qlora_inject.kernels.dequant_4bit import dequantize_4bit_torch, dequantize_blockwise_8bit
from qlora_inject.kernels.dequant_4bit_triton import dequantize_4bit_triton
from qlora_inject.kernels.workspace import scratch
import bitsandbytes.functional as F

torch.manual_seed(0)
for shape in [(64, 128), (40, 96), (7, 200)]:
    for quant_type in ("nf4", "fp4"):
        for nested in (False, True):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                weight = torch.randn(shape)
                packed, state = F.quantize_4bit(weight, blocksize=64, quant_type=quant_type,
                                                compress_statistics=nested)
                absmax = state.absmax
                if nested:
                    absmax = dequantize_blockwise_8bit(absmax, state.state2.code, state.state2.absmax,
                                                       state.state2.blocksize) + state.offset
                twin = dequantize_4bit_torch(packed, absmax, state.code, 64, tuple(state.shape), dtype)
                kernel = dequantize_4bit_triton(packed.to(D), absmax.to(D), state.code.to(D), 64,
                                                tuple(state.shape), dtype).cpu()
                assert kernel.dtype == dtype, dtype
                if dtype == torch.float32:
                    assert torch.equal(kernel, twin), (shape, quant_type, nested)
                    buffer = scratch(twin.numel(), dtype, D)
                    into = dequantize_4bit_triton(packed.to(D), absmax.to(D), state.code.to(D), 64,
                                                  tuple(state.shape), dtype, out=buffer)
                    assert into.data_ptr() == buffer.data_ptr() and torch.equal(into.cpu(), twin), "out="
                else:   # the interpreter's bf16/fp16 casts may round the last bit differently from torch's
                    ulp = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
                    torch.testing.assert_close(kernel.float(), twin.float(), atol=1e-6, rtol=ulp)
print("ok")
"""


def test_triton_4bit_dequantize_equals_its_torch_twin_under_the_interpreter():
    run_kernel_check(TRITON_CHECK)


GPTQ_AWQ_TRITON_CHECK = r"""
import os
import torch
D = os.environ.get("QLORA_INJECT_KERNEL_DEVICE", "cpu")
from qlora_inject.kernels.dequant_gptq import dequantize_awq_gemm_torch, dequantize_gptq_torch
from qlora_inject.kernels.dequant_gptq_triton import dequantize_awq4_triton, dequantize_gptq4_triton
from qlora_inject.kernels.workspace import scratch

torch.manual_seed(0)
for in_features, out_features, group_size in [(64, 32, 16), (96, 40, 32), (128, 64, -1)]:
    size = in_features if group_size == -1 else group_size
    groups = -(-in_features // size)
    for act_order in (False, True):
        g_idx = torch.arange(in_features, dtype=torch.int32) // size
        if act_order:
            g_idx = g_idx[torch.randperm(in_features)]
        qweight = torch.randint(-2**31, 2**31 - 1, (in_features // 8, out_features), dtype=torch.int32)
        qzeros = torch.randint(-2**31, 2**31 - 1, (groups, out_features // 8), dtype=torch.int32)
        for dtype in (torch.float32, torch.float16):
            scales = torch.rand(groups, out_features).to(dtype)
            for offset in (0, 1):
                expected = dequantize_gptq_torch(qweight, qzeros, scales, g_idx, 4, in_features, out_features, offset)
                kernel = dequantize_gptq4_triton(qweight.to(D), qzeros.to(D), scales.to(D), g_idx.to(D),
                                                 in_features, out_features, offset).cpu()
                assert kernel.dtype == dtype and torch.allclose(kernel.float(), expected.float(), rtol=1e-3), "gptq"
    qweight = torch.randint(-2**31, 2**31 - 1, (in_features, out_features // 8), dtype=torch.int32)
    qzeros = torch.randint(-2**31, 2**31 - 1, (groups, out_features // 8), dtype=torch.int32)
    scales = torch.rand(groups, out_features)
    expected = dequantize_awq_gemm_torch(qweight, qzeros, scales, 4, size, out_features, interleaved=True)
    kernel = dequantize_awq4_triton(qweight.to(D), qzeros.to(D), scales.to(D), size, out_features).cpu()
    assert torch.equal(kernel, expected), "awq"
    buffer = scratch(expected.numel(), expected.dtype, D)
    into = dequantize_awq4_triton(qweight.to(D), qzeros.to(D), scales.to(D), size, out_features, out=buffer)
    assert into.data_ptr() == buffer.data_ptr() and torch.equal(into.cpu(), expected), "awq out="
    gptq_qweight = torch.randint(-2**31, 2**31 - 1, (in_features // 8, out_features), dtype=torch.int32)
    g_idx = torch.arange(in_features, dtype=torch.int32) // size
    expected = dequantize_gptq_torch(gptq_qweight, qzeros, scales, g_idx, 4, in_features, out_features)
    into = dequantize_gptq4_triton(gptq_qweight.to(D), qzeros.to(D), scales.to(D), g_idx.to(D), in_features,
                                   out_features, out=buffer)
    assert into.data_ptr() == buffer.data_ptr() and torch.equal(into.cpu(), expected), "gptq out="
print("ok")
"""


def test_triton_gptq_and_awq_dequantize_equal_their_torch_twins_under_the_interpreter():
    run_kernel_check(GPTQ_AWQ_TRITON_CHECK)


HQQ_TRITON_CHECK = r"""
import os
import torch
D = os.environ.get("QLORA_INJECT_KERNEL_DEVICE", "cpu")
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
from qlora_inject.kernels.dequant_hqq import dequantize_hqq_torch
from qlora_inject.kernels.dequant_hqq_triton import dequantize_hqq4_triton
from qlora_inject.kernels.workspace import scratch

torch.manual_seed(0)
for axis in (0, 1):
    for group_size in (32, 64):
        for dtype in (torch.float32, torch.bfloat16):
            layer = HQQLinear(torch.nn.Linear(128, 48), BaseQuantizeConfig(nbits=4, group_size=group_size, axis=axis),
                              compute_dtype=dtype, device="cpu")
            expected = dequantize_hqq_torch(layer.W_q, layer.meta)
            meta = {k: v.to(D) if torch.is_tensor(v) else v for k, v in layer.meta.items()}
            kernel = dequantize_hqq4_triton(layer.W_q.to(D), meta).cpu()
            assert kernel.dtype == dtype and kernel.shape == expected.shape
            assert torch.allclose(kernel.float(), expected.float(), rtol=1e-2, atol=1e-3), (axis, group_size, dtype)
            buffer = scratch(expected.numel(), dtype, D)
            into = dequantize_hqq4_triton(layer.W_q.to(D), meta, out=buffer)
            assert into.data_ptr() == buffer.data_ptr() and torch.equal(into.cpu(), kernel), "out="
print("ok")
"""


def test_triton_hqq_4bit_dequantize_equals_its_torch_twin_under_the_interpreter():
    run_kernel_check(HQQ_TRITON_CHECK)


LORA_TRITON_CHECK = r"""
import os
import torch
D = os.environ.get("QLORA_INJECT_KERNEL_DEVICE", "cpu")
from qlora_inject.kernels.lora_batched import lora_gathered_torch, stack_adapters
from qlora_inject.kernels.lora_batched_triton import lora_gathered_triton

torch.manual_seed(0)
A, B = stack_adapters([(torch.randn(r, 100), torch.randn(70, r)) for r in (3, 16, 20)])
scaling = torch.tensor([0.5, 2.0, 1.0])
x = torch.randn(11, 100)
index = torch.tensor([0, 2, -1, 1, 1, 0, -1, 2, 2, 0, 1])
expected = lora_gathered_torch(x, A, B, scaling, index)
kernel = lora_gathered_triton(x.to(D), A.to(D), B.to(D), scaling.to(D), index.to(D)).cpu()
assert torch.allclose(kernel, expected, rtol=1e-4, atol=1e-4), (kernel - expected).abs().max()
assert torch.equal(kernel[2], torch.zeros(70)) and torch.equal(kernel[6], torch.zeros(70))
print("ok")
"""


def test_triton_mixed_adapter_shrink_expand_equals_its_torch_twin_under_the_interpreter():
    run_kernel_check(LORA_TRITON_CHECK)


@requires_cuda
@pytest.mark.parametrize("script", ["TRITON_CHECK", "GPTQ_AWQ_TRITON_CHECK", "HQQ_TRITON_CHECK", "LORA_TRITON_CHECK"])
def test_compiled_triton_kernels_equal_their_torch_twins_on_cuda(script):
    run_kernel_check(globals()[script], device="cuda")
