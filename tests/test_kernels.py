"""Pure-torch kernels: the re-dequantizing linear keeps no weight for backward and has exact gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qlora_inject.bench import saved_for_backward_bytes
from qlora_inject.kernels.dequant_matmul import dequantized_linear


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
    from qlora_inject.kernels.lora_batched import lora_gathered, lora_looped, stack_adapters

    pairs = [(torch.randn(r, 24), torch.randn(40, r)) for r in (2, 4, 8)]
    A, B = stack_adapters(pairs)
    assert A.shape == (3, 8, 24) and B.shape == (3, 40, 8)
    scaling = torch.tensor([0.5, 2.0, 1.0])
    x = torch.randn(9, 24)
    index = torch.tensor([0, 2, -1, 1, 1, 0, -1, 2, 2])
    gathered = lora_gathered(x, A, B, scaling, index)
    torch.testing.assert_close(gathered, lora_looped(x, A, B, scaling, index))
    for t, i in enumerate(index.tolist()):
        expected = torch.zeros(40) if i < 0 else scaling[i] * (pairs[i][1] @ (pairs[i][0] @ x[t]))
        torch.testing.assert_close(gathered[t], expected, atol=1e-4, rtol=1e-4)
