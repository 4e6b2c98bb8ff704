"""Fused RMSNorm and SwiGLU: equal to transformers' own Llama modules (forward and gradients), less kept
for backward, swapped into whole models of every format only where a probe agrees, and their Triton
kernels equal to the torch twins under the interpreter."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qlora_inject as qi
from qlora_inject.bench import saved_for_backward_bytes
from qlora_inject.fused_ops import FusedGatedMLP, FusedRMSNorm
from qlora_inject.kernels.rms_norm import rms_norm
from qlora_inject.kernels.swiglu import swiglu

from conftest import requires, requires_cuda
from factories import LLAMA_PROJECTIONS, load_tiny_llama, quant_params
from kernel_check import run_kernel_check

GRAD_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=48, intermediate_size=80, num_attention_heads=4, num_key_value_heads=2,
                       hidden_act="silu", rms_norm_eps=1e-5)


def forward_and_grads(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(dy)
    return (y, x.grad) + tuple(p.grad for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train_weight", [False, True])
def test_fused_rms_norm_equals_llama_rms_norm(dtype, train_weight):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    eager = LlamaRMSNorm(48, eps=1e-5).to(dtype)
    nn.init.normal_(eager.weight, 1.0, 0.3)
    eager.weight.requires_grad_(train_weight)
    fused = FusedRMSNorm(copy.deepcopy(eager))
    x, dy = torch.randn(3, 7, 48).to(dtype), torch.randn(3, 7, 48).to(dtype)
    expected, got = forward_and_grads(eager, x, dy), forward_and_grads(fused, x, dy)
    assert len(got) == len(expected) == 2 + train_weight
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)         # the forward: bit for bit
    for g, e in zip(got[1:], expected[1:], strict=True):
        torch.testing.assert_close(g, e, **GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_mlp_equals_llama_mlp_bit_for_bit(dtype):
    from transformers.models.llama.modeling_llama import LlamaMLP

    eager = LlamaMLP(llama_config()).to(dtype)
    fused = FusedGatedMLP(copy.deepcopy(eager))
    x, dy = torch.randn(2, 5, 48).to(dtype), torch.randn(2, 5, 48).to(dtype)
    for g, e in zip(forward_and_grads(fused, x, dy), forward_and_grads(eager, x, dy), strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)                    # the same torch ops, in one op


def test_fused_modules_keep_less_for_backward():
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    tokens, dtype = 64, torch.bfloat16
    x = torch.randn(tokens, 48, dtype=dtype, requires_grad=True)
    mlp = LlamaMLP(llama_config()).to(dtype).requires_grad_(False)
    eager_mlp = saved_for_backward_bytes(lambda: mlp(x))
    fused_mlp = saved_for_backward_bytes(lambda: FusedGatedMLP(mlp)(x))
    assert eager_mlp - fused_mlp == tokens * 80 * 2                         # silu(gate) is not kept
    norm = LlamaRMSNorm(48).to(dtype).requires_grad_(False)
    eager_norm = saved_for_backward_bytes(lambda: norm(x))
    fused_norm = saved_for_backward_bytes(lambda: FusedRMSNorm(norm)(x))
    assert fused_norm == x.numel() * 2 + 48 * 2 + tokens * 4                # x, weight, one fp32 rstd per row
    assert eager_norm >= x.numel() * 4                                      # an fp32 copy of x


QUANTS = quant_params("none", "nf4", "int8", "hqq", "gptq", "awq")


@pytest.mark.parametrize("quant", QUANTS)
def test_fused_model_trains_as_the_unfused_one_on_every_format(quant):
    model = qi.LoraModel(load_tiny_llama(quant), qi.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_PROJECTIONS))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(parameter, 0.0, 0.05)                          # a trained adapter, not a zero one
    reference = copy.deepcopy(model)
    before = model.state_dict().keys()
    report = qi.fuse_llama_ops(model)
    assert len(report.norms) == 5 and len(report.mlps) == 2 and not report.skipped, str(report)
    assert model.state_dict().keys() == before
    ids = torch.randint(0, 128, (2, 12))
    got, expected = model(input_ids=ids, labels=ids), reference(input_ids=ids, labels=ids)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=0)
    got.loss.backward()
    expected.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    for name, parameter in reference.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(grads[name], parameter.grad, rtol=1e-4, atol=1e-6)
    assert qi.unfuse_llama_ops(model) == 7
    assert not any(isinstance(m, (FusedRMSNorm, FusedGatedMLP)) for m in model.modules())
    torch.testing.assert_close(model(input_ids=ids).logits, expected.logits, rtol=0, atol=0)


@pytest.mark.parametrize("quant", [pytest.param("nf4", marks=requires("bitsandbytes")), "none"])
def test_merge_and_unload_gives_back_the_models_own_modules(quant):
    model = qi.LoraModel(load_tiny_llama(quant), qi.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_PROJECTIONS))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(parameter, 0.0, 0.05)
    qi.fuse_llama_ops(model)
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        merged = model.merge_and_unload(dequantize=True)
        got = merged(input_ids=ids).logits
    assert not any(isinstance(m, (FusedRMSNorm, FusedGatedMLP)) for m in merged.modules())
    assert type(merged.model.layers[0].mlp).__name__ == "LlamaMLP"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@requires("peft")
def test_fusing_a_peft_model_keeps_its_outputs():
    import peft

    model = peft.get_peft_model(load_tiny_llama("none"), peft.LoraConfig(r=4, target_modules=LLAMA_PROJECTIONS))
    model.eval()
    ids = torch.randint(0, 128, (1, 10))
    expected = model(input_ids=ids).logits
    report = qi.fuse_llama_ops(model)
    assert (len(report.norms), len(report.mlps)) == (5, 2)
    assert not any(module.training for module in model.modules())          # the swapped-in modules too
    torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)


class GemmaLikeNorm(nn.Module):
    """Looks like Llama's RMSNorm (weight, variance_epsilon) but scales by 1 + w."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width))
        self.variance_epsilon = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1 + self.weight)


class GeluMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
        self.act_fn = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@requires("bitsandbytes")
@requires("transformers")
def test_the_fusion_probe_leaves_bare_4bit_layers_as_they_were():
    """bitsandbytes repacks a bare 4-bit layer on its first eval-mode forward on AVX512-BF16 CPUs; the probe
    that decides each swap runs the model's own MLP in eval mode, so it must not let that happen."""
    model = load_tiny_llama("nf4")                                        # not wrapped by LoRA: bare layers
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True                           # as bitsandbytes sets it on such CPUs
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = qi.fuse_llama_ops(model)
    assert report.mlps                                                     # the probe ran on the 4-bit MLPs
    assert all(layer.support_avx512bf16_for_cpu for layer in layers)       # the model's own setting is kept
    assert not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for layer in layers)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k in after)


def test_unfusing_keeps_a_norm_weight_replaced_after_the_swap():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    model = nn.Sequential(LlamaRMSNorm(8))
    qi.fuse_llama_ops(model)
    replaced = nn.Parameter(torch.full((8,), 2.0))
    model.load_state_dict({"0.weight": replaced}, assign=True)               # a new Parameter, not a copy
    assert qi.unfuse_llama_ops(model) == 1
    assert isinstance(model[0], LlamaRMSNorm) and model[0].weight is model.get_parameter("0.weight")
    torch.testing.assert_close(model[0].weight, replaced)


def test_look_alikes_with_other_numerics_are_left_and_named():
    model = nn.Sequential(GemmaLikeNorm(8), GeluMLP())
    report = qi.fuse_llama_ops(model)
    assert report.norms == [] and report.mlps == []
    assert set(report.skipped) == {"0", "1"} and "other numerics" in report.skipped["0"]
    assert isinstance(model[0], GemmaLikeNorm) and isinstance(model[1], GeluMLP)


def test_bad_input_is_named():
    with pytest.raises(TypeError, match="expects a torch.nn.Module, got str"):
        qi.fuse_llama_ops("model")
    with pytest.raises(ValueError, match=r"weight of shape \(5,\) does not match .* expected a weight of shape \(4,\)"):
        rms_norm(torch.randn(2, 4), torch.ones(5), 1e-6)
    with pytest.raises(ValueError, match="swiglu: gate"):
        swiglu(torch.randn(2, 4), torch.randn(2, 5))


FUSED_TRITON_CHECK = r"""
import os
import torch
D = os.environ.get("QLORA_INJECT_KERNEL_DEVICE", "cpu")
from qlora_inject.kernels.rms_norm import rms_norm_backward_torch, rms_norm_forward_torch
from qlora_inject.kernels.rms_norm_triton import rms_norm_backward_triton, rms_norm_forward_triton
from qlora_inject.kernels.swiglu import swiglu_backward_torch, swiglu_forward_torch
from qlora_inject.kernels.swiglu_triton import swiglu_backward_triton, swiglu_forward_triton

torch.manual_seed(0)
# bf16: the interpreter truncates fp32 -> bf16 where the GPU rounds to nearest, so up to 2 ulps apart
tolerance = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 2e-3}


def close(got, expected, what):
    assert got.dtype == expected.dtype and got.shape == expected.shape, (what, got.dtype, got.shape)
    error = ((got.cpu().float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-6)).item()
    assert error <= tolerance[expected.dtype], f"{what}: relative error {error:.2e}"


for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for shape in [(3, 5, 48), (7, 100)]:
        x, dy = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
        weight = (1 + 0.3 * torch.randn(shape[-1])).to(dtype)
        y, rstd = rms_norm_forward_torch(x, weight, 1e-6)
        kernel_y, kernel_rstd = rms_norm_forward_triton(x.to(D), weight.to(D), 1e-6)
        close(kernel_y, y, f"rms_norm y {dtype} {shape}")
        close(kernel_rstd, rstd, f"rms_norm rstd {dtype} {shape}")
        for weight_grad in (False, True):
            dx, dw = rms_norm_backward_torch(dy, x, weight, rstd, weight_grad)
            kernel_dx, kernel_dw = rms_norm_backward_triton(dy.to(D), x.to(D), weight.to(D), rstd.to(D), weight_grad)
            close(kernel_dx, dx, f"rms_norm dx {dtype} {shape}")
            assert (kernel_dw is None) == (dw is None)
            if weight_grad:
                close(kernel_dw, dw, f"rms_norm dw {dtype} {shape}")
        g, u = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
        close(swiglu_forward_triton(g.to(D), u.to(D)), swiglu_forward_torch(g, u), f"swiglu h {dtype}")
        dg, du = swiglu_backward_torch(dy, g, u)
        kernel_dg, kernel_du = swiglu_backward_triton(dy.to(D), g.to(D), u.to(D))
        close(kernel_dg, dg, f"swiglu dg {dtype}")
        close(kernel_du, du, f"swiglu du {dtype}")
print("ok")
"""


def test_triton_rms_norm_and_swiglu_equal_their_torch_twins_under_the_interpreter():
    run_kernel_check(FUSED_TRITON_CHECK)


@requires_cuda
def test_compiled_rms_norm_and_swiglu_kernels_equal_their_torch_twins_on_cuda():
    run_kernel_check(FUSED_TRITON_CHECK, device="cuda")
