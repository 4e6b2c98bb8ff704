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
                                                       state.state2.blocksize, state.offset)
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


def _nf4_weight(rows: int, cols: int):
    """Random NF4-layout storage (blocks of 64) and its twin's dense weight, for the tiled products."""
    from qlora_inject.kernels.dequant_4bit import dequantize_4bit, dequantize_4bit_torch
    from qlora_inject.kernels.workspace import scratch

    numel = rows * cols
    packed = torch.randint(0, 256, ((numel + 1) // 2,), dtype=torch.uint8)
    absmax = torch.rand(-(-numel // 64)) + 0.5
    code = torch.linspace(-1, 1, 16)
    calls = []

    def dequantize(dtype: torch.dtype):
        def run() -> torch.Tensor:
            calls.append(1)
            return dequantize_4bit(packed, absmax, code, 64, (rows, cols), dtype, out=scratch(numel, dtype, "cpu"))
        return run

    return dequantize, lambda dtype: dequantize_4bit_torch(packed, absmax, code, 64, (rows, cols), dtype), calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("rows", "cols"), [(300, 128), (37, 96), (64, 40)])
def test_tiled_products_equal_the_whole_weight_within_the_stated_bound(rows, cols, dtype, monkeypatch):
    from qlora_inject.kernels import dequant_cpu, dequant_matmul_tiled

    if not dequant_cpu.available():
        pytest.skip("the tiles are dequantized by the numba kernel: pip install numba")
    monkeypatch.setattr(dequant_matmul_tiled, "TILE_BYTES", 4096)              # several tiles, a partial last one
    dequantize, twin, calls = _nf4_weight(rows, cols)
    weight = twin(dtype)
    x, g, bias = torch.randn(5, cols, dtype=dtype), torch.randn(5, rows, dtype=dtype), torch.randn(rows)
    out = dequant_matmul_tiled.linear_tiled(x, dequantize(dtype), dtype, bias)
    assert len(calls) == -(-rows // dequant_matmul_tiled.tile_rows(cols, weight.element_size(), 2)) > 1
    grad_x = dequant_matmul_tiled.grad_input_tiled(g, dequantize(dtype), dtype)
    assert out.dtype == grad_x.dtype == dtype
    expected_out = torch.addmm(bias.to(dtype), x, weight.t())
    expected_grad = g @ weight
    # fp32: a few ulps (other summation order); bf16: one bf16 ulp (sums kept in fp32, rounded once).
    rtol = 1e-6 if dtype == torch.float32 else 2 ** -7
    for name, got, expected in (("forward", out, expected_out), ("input gradient", grad_x, expected_grad)):
        bound = rtol * expected.float().abs().max().item() + 1e-6
        error = (got.float() - expected.float()).abs().max().item()
        assert error <= bound, f"tiled {name} is {error:.3g} off the whole-weight product, more than {bound:.3g}"


def test_a_weight_that_cannot_tile_is_used_whole_once():
    from qlora_inject.kernels import dequant_matmul_tiled

    weight, x, g = torch.randn(40, 24), torch.randn(3, 24), torch.randn(3, 40)
    calls = []

    def dequantize() -> torch.Tensor:                                        # a dense weight: no row ranges
        calls.append(1)
        return weight

    assert torch.equal(dequant_matmul_tiled.linear_tiled(x, dequantize, torch.float32, None), x @ weight.t())
    assert torch.equal(dequant_matmul_tiled.grad_input_tiled(g, dequantize, torch.float32), g @ weight)
    assert len(calls) == 2


def test_a_tile_that_splits_a_block_is_refused():
    from qlora_inject.kernels import dequant_cpu, dequant_matmul_tiled

    if not dequant_cpu.available():
        pytest.skip("the tiles are dequantized by the numba kernel: pip install numba")
    dequantize, _, _ = _nf4_weight(37, 96)
    with dequant_matmul_tiled.only_rows(1), pytest.raises(ValueError, match="starts at a multiple of 2 rows, not"):
        dequantize(torch.float32)()


@pytest.mark.parametrize(("forced", "tiles"), [("torch", False), ("numba", True)])
def test_the_fused_op_takes_the_measured_or_forced_product(forced, tiles, monkeypatch):
    from qlora_inject.kernels import autotune, dequant_cpu, dequant_matmul_tiled
    from qlora_inject.kernels.fused_lora import AdapterTerm, fused_lora_linear

    if not dequant_cpu.available():
        pytest.skip("the tiles are dequantized by the numba kernel: pip install numba")
    monkeypatch.setattr(dequant_matmul_tiled, "TILE_BYTES", 4096)
    monkeypatch.setenv("QLORA_INJECT_KERNEL", forced)
    autotune.reset()
    dequantize, twin, calls = _nf4_weight(300, 128)
    x = torch.randn(2, 3, 128, requires_grad=True)
    A, B = torch.randn(4, 128, requires_grad=True), torch.randn(300, 4, requires_grad=True)
    out = fused_lora_linear(x, None, dequantize(torch.float32), torch.float32, [(A, B, AdapterTerm(0.5))], True)
    out.backward(torch.ones_like(out))
    assert (len(calls) > 2) == tiles                                          # whole: one call each way
    reference_x = x.detach().clone().requires_grad_(True)
    expected = reference_x @ twin(torch.float32).t() + 0.5 * (reference_x @ A.detach().t()) @ B.detach().t()
    expected.backward(torch.ones_like(expected))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x.grad, reference_x.grad, rtol=1e-5, atol=1e-4)
    autotune.reset()


def test_a_class_that_kept_the_whole_weight_runs_it_with_no_probe_tile(monkeypatch):
    from qlora_inject.kernels import autotune, dequant_cpu, dequant_matmul_tiled
    from qlora_inject.kernels.fused_lora import AdapterTerm, fused_lora_linear

    if not dequant_cpu.available():
        pytest.skip("the tiles are dequantized by the numba kernel: pip install numba")
    monkeypatch.setattr(dequant_matmul_tiled, "TILE_BYTES", 4096)
    monkeypatch.delenv("QLORA_INJECT_KERNEL", raising=False)
    autotune.reset()
    dequantize, twin, calls = _nf4_weight(300, 128)
    x = torch.randn(6, 128, requires_grad=True)
    g = torch.ones(6, 300)
    run = dequantize(torch.float32)
    for product, left in (("x·Wᵀ", x), ("g·W", g)):                          # both classes measured: whole kept
        autotune._choices[dequant_matmul_tiled._class(product, (300, 128), left, run)] = "torch"
    A, B = torch.randn(4, 128, requires_grad=True), torch.randn(300, 4, requires_grad=True)
    out = fused_lora_linear(x, None, run, torch.float32, [(A, B, AdapterTerm(0.5))], True)
    out.backward(g)
    assert len(calls) == 2, f"{len(calls)} dequantizations: a probe tile ran before a kept whole weight"
    reference = x.detach() @ twin(torch.float32).t() + 0.5 * (x.detach() @ A.detach().t()) @ B.detach().t()
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-4)
    monkeypatch.setenv("QLORA_INJECT_KERNEL", "numba")                       # forcing the tiles still forces them
    fused_lora_linear(x, None, dequantize(torch.float32), torch.float32, [(A, B, AdapterTerm(0.5))], True)
    assert len(calls) > 3
    autotune.reset()


def test_the_input_gradient_may_take_w_in_major_with_the_same_values(monkeypatch):
    """bf16: `g · W` is offered W in-major (its transpose contiguous, which oneDNN reads faster here); kept,
    the backward asks the dequantization for it, and the gradient is within one bf16 rounding of the
    whole-weight product's. fp32 is not offered it."""
    from qlora_inject.kernels import autotune, dequant_cpu, dequant_matmul_tiled
    from qlora_inject.kernels.fused_lora import AdapterTerm, fused_lora_linear

    if not (dequant_cpu.available() and dequant_cpu.avx512()):
        pytest.skip("the in-major NF4 kernel needs numba and AVX-512")
    monkeypatch.delenv("QLORA_INJECT_KERNEL", raising=False)
    autotune.reset()
    dtype = torch.bfloat16
    dequantize, twin, calls = _nf4_weight(320, 128)
    run = dequantize(dtype)
    asked = []

    def recorded() -> torch.Tensor:
        asked.append(dequant_matmul_tiled.requested_layout() is not None)
        return run()

    x = torch.randn(6, 128, dtype=dtype)
    g = torch.randn(6, 320, dtype=dtype)
    A, B = torch.randn(4, 128, dtype=dtype, requires_grad=True), torch.randn(320, 4, dtype=dtype, requires_grad=True)
    gradients = {}
    for kept in ("torch", "torch-in-major"):                                   # the same op, W in either layout
        autotune._choices[dequant_matmul_tiled._class("x·Wᵀ", (320, 128), x, recorded)] = "torch"
        autotune._choices[dequant_matmul_tiled._class("g·W", (320, 128), g, recorded)] = kept
        asked.clear()
        leaf = x.clone().requires_grad_(True)
        fused_lora_linear(leaf, None, recorded, dtype, [(A, B, AdapterTerm(0.5))], True).backward(g)
        assert asked == [False, kept == "torch-in-major"]
        gradients[kept] = leaf.grad.float()
    # oneDNN may sum the two layouts in other orders (fp32 accumulation): one bf16 rounding apart at most.
    bound = 2 ** -7 * gradients["torch"].abs().max().item()
    assert (gradients["torch-in-major"] - gradients["torch"]).abs().max().item() <= bound
    monkeypatch.setattr(dequant_matmul_tiled, "TILE_BYTES", 4096)              # a weight that tiles: measured
    assert "torch-in-major" not in _input_gradient_candidates(torch.float32)
    assert "torch-in-major" in _input_gradient_candidates(dtype)
    autotune.reset()


def _input_gradient_candidates(dtype: torch.dtype) -> list[str]:
    """The names `grad_input` offers the measurement for a weight that tiles, in `dtype`."""
    from qlora_inject.kernels import autotune, dequant_matmul_tiled

    seen = []
    original = autotune.choose

    def spy(key, candidates, margin=autotune.MARGIN):
        if "g·W" in str(key[0]):
            seen.extend(candidates)
        return original(key, candidates, margin)

    dequantize, _, _ = _nf4_weight(320, 128)
    autotune.choose = spy
    try:
        dequant_matmul_tiled.grad_input(torch.randn(2, 320, dtype=dtype), dequantize(dtype), dtype, None)
    finally:
        autotune.choose = original
    return seen


def test_a_measured_candidate_may_dispatch_a_measured_dequantization(monkeypatch):
    import threading

    from qlora_inject.kernels import autotune

    monkeypatch.delenv("QLORA_INJECT_KERNEL", raising=False)
    autotune.reset()
    inner = {"torch": lambda: 1, "numba": lambda: 1}
    outer = {name: lambda: autotune.choose(("inner",), inner) for name in ("torch", "numba-tiles")}
    worker = threading.Thread(target=lambda: [autotune.choose(("outer",), outer) for _ in range(3)], daemon=True)
    worker.start()
    worker.join(timeout=30)                                                  # the tiled product inside a measurement
    assert not worker.is_alive(), "autotune deadlocked: a measurement's candidate waited for the measurement's lock"
    assert ("outer",) in autotune.decisions() and ("inner",) in autotune.decisions()
    autotune.reset()


def test_a_near_tie_keeps_the_default_path(monkeypatch):
    import time

    from qlora_inject.kernels import autotune

    monkeypatch.delenv("QLORA_INJECT_KERNEL", raising=False)
    autotune.reset()
    paths = {"numba": lambda: time.sleep(0.010) or "all threads", "numba-1-threads": lambda: time.sleep(0.0095) or "1"}
    for _ in range(2):
        kept = autotune.choose(("near tie",), paths)                          # 5 % faster: noise, not a reason
    assert kept == "all threads" and autotune.decisions()[("near tie",)][0] == "numba"
    paths["numba-1-threads"] = lambda: time.sleep(0.005) or "1"
    autotune.reset()
    for _ in range(2):
        kept = autotune.choose(("clear",), paths)                             # twice as fast: replaces it
    assert kept == "1"
    autotune.reset()


def test_each_candidate_may_have_its_own_margin(monkeypatch):
    """A whole weight in-major (one kernel, one matmul) is kept at a small steady gain; tiles, whose many
    parallel regions hide a spread, need a clear one: the same 7 % gain keeps one and not the other."""
    import time

    from qlora_inject.kernels import autotune, dequant_matmul_tiled

    monkeypatch.delenv("QLORA_INJECT_KERNEL", raising=False)
    autotune.reset()
    for name, expected in (("torch-in-major", "other"), ("numba-tiles", "whole")):
        paths = {"torch": lambda: time.sleep(0.030) or "whole", name: lambda: time.sleep(0.028) or "other"}
        for _ in range(2):
            kept = autotune.choose((name,), paths, margin=dequant_matmul_tiled._MARGINS)
        assert kept == expected, name
    autotune.reset()


def test_a_products_class_names_the_weights_format():
    from qlora_inject.kernels import dequant_matmul_tiled

    def nf4() -> torch.Tensor: ...

    def int8() -> torch.Tensor: ...

    nf4.format, int8.format = "bnb-4bit", "bnb-8bit"
    g = torch.ones(4, 64)
    classes = {dequant_matmul_tiled._class("g·W", (64, 32), g, run) for run in (nf4, int8)}
    assert len(classes) == 2                                                 # one format's choice is not another's


def test_another_path_replaces_the_default_only_when_a_margin_faster(monkeypatch):
    import time

    from qlora_inject.kernels import autotune

    monkeypatch.delenv("QLORA_INJECT_KERNEL", raising=False)
    autotune.reset()
    paths = {"torch": lambda: time.sleep(0.010) or "torch", "numba-tiles": lambda: time.sleep(0.009) or "tiles"}
    for _ in range(2):
        kept = autotune.choose(("margin",), paths, margin=1.5)               # 10 % faster: not enough
    assert kept == "torch" and autotune.decisions()[("margin",)][0] == "torch"
    autotune.reset()
