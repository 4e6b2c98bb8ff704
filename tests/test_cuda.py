"""On a CUDA GPU: the Triton dequantizers equal the CPU twins bit for bit, and the fused op on the GPU
equals the fused op on the CPU. Random packed codes, so no quantization library is needed; skipped
(with the reason) where there is no GPU. `benchmarks/gpu_check.sh` runs these."""

from __future__ import annotations

import pytest
import torch

from qlora_inject.kernels.dequant_4bit import dequantize_4bit_torch
from qlora_inject.kernels.dequant_gptq import dequantize_awq_gemm_torch, dequantize_gptq_torch
from qlora_inject.kernels.dequant_hqq import dequantize_hqq_torch
from qlora_inject.kernels.fused_lora import AdapterTerm, fused_lora_linear
from qlora_inject.kernels.workspace import scratch

from conftest import requires_cuda

pytestmark = requires_cuda
OUT, IN = 96, 256


def _words(*shape: int) -> torch.Tensor:
    return torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32)


def _on(device: str, value):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _on(device, v) for k, v in value.items()}
    return value


def _cases(dtype: torch.dtype):
    """(name, dispatcher, twin, arguments) per format, arguments on the CPU."""
    from qlora_inject.kernels.dequant_4bit import dequantize_4bit
    from qlora_inject.kernels.dequant_gptq import dequantize_awq_gemm, dequantize_gptq
    from qlora_inject.kernels.dequant_hqq import dequantize_hqq

    torch.manual_seed(0)
    nf4 = (torch.randint(0, 256, (OUT * IN // 2,), dtype=torch.uint8), torch.rand(OUT * IN // 64),
           torch.linspace(-1, 1, 16), 64, (OUT, IN), dtype)
    gptq = (_words(IN // 8, OUT), _words(IN // 32, OUT // 8), (torch.rand(IN // 32, OUT) * 0.1).to(dtype),
            torch.randperm(IN) // 32, 4, IN, OUT, 0)
    awq = (_words(IN, OUT // 8), _words(IN // 32, OUT // 8), (torch.rand(IN // 32, OUT) * 0.1).to(dtype), 4, 32, OUT,
           True)
    rows = OUT * IN // 64
    hqq = (torch.randint(0, 256, (rows // 2, 64), dtype=torch.uint8),
           {"packing": "4bit_u8", "axis": 1, "group_size": 64, "shape": (OUT, IN), "compute_dtype": dtype,
            "zero": (torch.rand(rows, 1) * 15).to(dtype), "scale": torch.rand(rows, 1).to(dtype)})
    return [("nf4", dequantize_4bit, dequantize_4bit_torch, nf4),
            ("gptq", dequantize_gptq, dequantize_gptq_torch, gptq),
            ("awq", dequantize_awq_gemm, dequantize_awq_gemm_torch, awq),
            ("hqq", dequantize_hqq, dequantize_hqq_torch, hqq)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_dequantizers_equal_the_cpu_twins_and_write_into_the_scratch(dtype):
    for name, dispatcher, twin, args in _cases(dtype):
        expected = twin(*args)
        cuda_args = [_on("cuda", a) for a in args]
        got = dispatcher(*cuda_args)
        assert torch.equal(got.cpu(), expected), name
        buffer = scratch(OUT * IN, dtype, "cuda")
        into = dispatcher(*cuda_args, out=buffer)
        assert into.data_ptr() == buffer.data_ptr() and torch.equal(into.cpu(), expected), name


def test_cuda_fused_op_equals_the_cpu_fused_op():
    for name, dispatcher, twin, args in _cases(torch.bfloat16):
        results = {}
        for device in ("cpu", "cuda"):
            torch.manual_seed(1)
            device_args = [_on(device, a) for a in args]
            A = torch.randn(8, IN, device=device, requires_grad=True)
            B = torch.randn(OUT, 8, device=device, requires_grad=True)
            x = torch.randn(3, IN, device=device, dtype=torch.bfloat16, requires_grad=True)
            weight = (dispatcher if device == "cuda" else twin)
            out = fused_lora_linear(x, None, lambda w=weight, a=device_args: w(*a), torch.bfloat16,
                                    [(A, B, AdapterTerm(0.5))], False)
            out.float().square().sum().backward()
            results[device] = [t.detach().float().cpu() for t in (out, x.grad, A.grad, B.grad)]
        for cpu, cuda in zip(results["cpu"], results["cuda"], strict=True):
            torch.testing.assert_close(cuda, cpu, atol=0.1, rtol=0.05, msg=name)


def test_lora_linear_trains_fused_on_cuda():
    from qlora_inject import LoraConfig, inject

    model = torch.nn.Sequential(torch.nn.Linear(IN, OUT)).cuda().to(torch.bfloat16)
    inject(model, LoraConfig(r=4, target_modules=["0"], init_lora_weights=False))
    x = torch.randn(4, IN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    fused = model(x)
    model[0].fuse = False
    unfused = model(x)
    torch.testing.assert_close(fused, unfused, atol=5e-2, rtol=2e-2)
    fused.float().sum().backward()
    assert model[0].lora_A["default"].weight.grad is not None
