"""The fused LoRA linear: same outputs and gradients as the unfused path, on every fused format.

It must also keep no dense weight for backward, dequantize once per forward and once per backward
(none when the input needs no gradient), honour dropout, several adapters and a trainable bias,
and step aside where it does not apply (inference, DoRA, mixed batches, int8).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qlora_inject import LoraConfig, inject
from qlora_inject.bench import saved_for_backward_bytes
from qlora_inject.kernels.fused_lora import AdapterTerm, fused_lora_linear
from qlora_inject.registry import base_forward_is_exact

from factories import FORMAT_LAYERS, IN_FEATURES, Holder, format_params

FUSED_FORMATS = list(FORMAT_LAYERS)                                 # every registered format and variant


def _wrapped(fmt: str, **config) -> Holder:
    model = Holder(FORMAT_LAYERS[fmt][0]())
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["proj"], "init_lora_weights": False}
    inject(model, LoraConfig(**{**settings, **config}))
    return model


def _step(model: Holder, x: torch.Tensor, grad: torch.Tensor, fuse: bool) -> dict[str, torch.Tensor]:
    """Output and every gradient of one forward + backward, fused or not."""
    model.proj.fuse = fuse
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.backward(grad)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {"out": out.detach(), "x": x.grad, **grads}


def _assert_same_step(model: Holder, x: torch.Tensor, seed: int | None = None) -> dict[str, torch.Tensor]:
    grad = torch.randn(*x.shape[:-1], model.proj.out_features)
    if seed is not None:
        torch.manual_seed(seed)
    fused = _step(model, x, grad, fuse=True)
    if seed is not None:
        torch.manual_seed(seed)
    unfused = _step(model, x, grad, fuse=False)
    assert fused.keys() == unfused.keys()
    for name in fused:
        torch.testing.assert_close(fused[name], unfused[name], atol=1e-4, rtol=1e-4, msg=name)
    return fused


@pytest.mark.parametrize("fmt", format_params(*FUSED_FORMATS))
def test_fused_equals_unfused_with_two_adapters(fmt):
    model = _wrapped(fmt)
    model.proj.update_layer("second", _spec(r=2, alpha=3))
    model.proj.set_adapter(["default", "second"])
    torch.manual_seed(1)
    grads = _assert_same_step(model, torch.randn(2, 3, IN_FEATURES))
    assert {"proj.lora_A.second.weight", "proj.lora_B.default.weight"} <= grads.keys()


@pytest.mark.parametrize("fmt", format_params("nf4", "hqq", "gptq", "dense"))
def test_fused_dropout_and_trainable_bias_equal_unfused(fmt):
    model = _wrapped(fmt, lora_dropout=0.3, bias="all")
    model.train()
    torch.manual_seed(2)
    grads = _assert_same_step(model, torch.randn(4, IN_FEATURES), seed=7)
    if isinstance(model.proj.base_layer.bias, torch.nn.Parameter):          # GPTQModel keeps bias as a buffer
        assert "proj.base_layer.bias" in grads


@pytest.mark.parametrize("fmt", format_params("nf4", "int8", "hqq", "awq"))
def test_no_dense_weight_is_saved_and_backward_dequantizes_only_for_the_input_gradient(fmt, monkeypatch):
    model = _wrapped(fmt)
    layer = model.proj
    calls = []
    original = layer.backend.dequantize
    monkeypatch.setattr(layer.backend, "dequantize", lambda m, out=None: calls.append(1) or original(m, out=out))
    x = torch.randn(8, IN_FEATURES, requires_grad=True)
    saved = saved_for_backward_bytes(lambda: model(x))
    weight_bytes = layer.in_features * layer.out_features * 4
    adapter_bytes = sum(p.numel() * p.element_size() for p in layer.parameters() if p.requires_grad)
    assert saved <= x.numel() * 4 + adapter_bytes + 8 * 4 * 4 < weight_bytes
    in_forward = int(base_forward_is_exact(layer.backend, layer.base_layer, x.device))   # else its own forward
    for _ in range(2):                                                      # the products' paths measured (autotune)
        model(x).sum().backward()
    calls.clear()
    model(x).sum().backward()
    assert len(calls) == in_forward + 1                                     # (forward) + backward
    calls.clear()
    model(x.detach()).sum().backward()                                      # no input gradient: no re-dequantize
    assert len(calls) == in_forward


@pytest.mark.parametrize("fmt", format_params("nf4"))
def test_bf16_autocast_runs_fused_in_the_autocast_dtype(fmt):
    model = _wrapped(fmt)
    x = torch.randn(4, IN_FEATURES, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = model(x)
        model.proj.fuse = False
        unfused = model(x)
    torch.testing.assert_close(fused.float(), unfused.float(), atol=5e-2, rtol=3e-2)
    fused.float().sum().backward()
    assert model.proj.lora_A["default"].weight.grad.dtype == torch.float32


def test_adapters_are_fused_only_where_the_fused_path_applies(monkeypatch):
    import qlora_inject.lora as lora

    adapters_per_call = []
    monkeypatch.setattr(lora, "fused_lora_linear",
                        lambda *a, **k: adapters_per_call.append(len(a[4])) or fused_lora_linear(*a, **k))
    model = _wrapped("dense")
    x = torch.randn(2, IN_FEATURES)
    with torch.no_grad():
        model(x)                                                            # CPU inference: fused too
    model(x).sum().backward()
    assert adapters_per_call == [1, 1]
    adapters_per_call.clear()
    _wrapped("dense", use_dora=True)(x).sum().backward()                    # DoRA: its own path
    model.proj.set_adapter([])
    model(x)                                                                # no active adapter: the base alone
    model.proj.set_adapter(["default"])
    model.proj.batch_adapters = ["default", "__base__"]
    model(x)                                                                # mixed batch: the gathered path
    assert adapters_per_call and set(adapters_per_call) == {0}              # only ever the base, on CPU


def test_op_matches_the_formula_with_fp32_adapters_and_bf16_compute():
    torch.manual_seed(3)
    weight = torch.randn(24, 16)
    A, B = torch.randn(4, 16, requires_grad=True), torch.randn(24, 4, requires_grad=True)
    x = torch.randn(5, 16, dtype=torch.bfloat16, requires_grad=True)
    out = fused_lora_linear(x, None, lambda: weight.clone(), torch.bfloat16, [(A, B, AdapterTerm(0.5))], False)
    reference = F.linear(x.float(), weight) + 0.5 * x.float() @ A.t() @ B.t()
    torch.testing.assert_close(out.float(), reference, atol=0.3, rtol=3e-2)
    out.float().sum().backward()
    assert A.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


def _spec(r: int, alpha: float):
    from qlora_inject.lora import AdapterSpec

    return AdapterSpec(r=r, lora_alpha=alpha, init_lora_weights=False)
