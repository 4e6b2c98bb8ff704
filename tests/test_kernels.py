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
