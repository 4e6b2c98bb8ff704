"""Checks every backend's tests share: LoRA math against an independent reference, and against PEFT."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qlora_inject import LoraConfig, inject

from factories import IN_FEATURES, Holder

# Tolerances per compute dtype.
TOL = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 3e-2, "rtol": 2e-2},
    torch.float16: {"atol": 5e-3, "rtol": 5e-3},
}


def lora_config(**overrides) -> LoraConfig:
    """A one-layer config with random (non-zero) adapters, so the LoRA term is visible."""
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["proj"], "init_lora_weights": False}
    settings.update(overrides)
    return LoraConfig(**settings)


def lora_term(x: torch.Tensor, layer: nn.Module, adapter: str = "default") -> torch.Tensor:
    """s · x Aᵀ Bᵀ, computed in fp32 straight from the adapter's parameters."""
    A = layer.lora_A[adapter].weight.float()
    B = layer.lora_B[adapter].weight.float()
    return layer.scaling[adapter] * (x.float() @ A.t() @ B.t())


def assert_dequantized_plus_lora(make_layer: Callable[[], nn.Module], dequantized: torch.Tensor,
                                 dtype: torch.dtype, tol: dict | None = None) -> None:
    """Wrapped output == x · dequantized(W)ᵀ + bias + LoRA term, within the dtype's tolerance."""
    model = Holder(make_layer())
    bias = model.proj.bias
    inject(model, lora_config())
    x = torch.randn(3, 5, IN_FEATURES).to(dtype)
    expected = F.linear(x.float(), dequantized.float(), None if bias is None else bias.float())
    expected = expected + lora_term(x, model.proj)
    torch.testing.assert_close(model(x).float(), expected, **(tol or TOL[dtype]))


def assert_matches_peft(make_layer: Callable[[], nn.Module], dtype: torch.dtype, tol: dict | None = None,
                        **config) -> None:
    """Same adapter weights in this library and in PEFT: same outputs, same adapter gradients."""
    import peft

    ours = Holder(make_layer())
    theirs = Holder(make_layer())
    theirs.anchor = nn.Parameter(torch.zeros(1))            # PEFT reads the device off some parameter
    inject(ours, lora_config(**config))
    peft_settings = lora_config(**config).to_dict()
    peft_config = peft.LoraConfig(**{k: peft_settings[k] for k in (
        "r", "lora_alpha", "target_modules", "init_lora_weights", "use_rslora", "lora_dropout", "use_dora")})
    peft_model = peft.LoraModel(theirs, peft_config, "default")
    names = ("lora_A", "lora_B", "lora_magnitude_vector") if config.get("use_dora") else ("lora_A", "lora_B")
    with torch.no_grad():
        for name in names:
            getattr(theirs.proj, name)["default"].weight.copy_(getattr(ours.proj, name)["default"].weight)
    x = torch.randn(2, 6, IN_FEATURES).to(dtype)
    y_ours, y_peft = ours(x), peft_model(x)
    torch.testing.assert_close(y_ours.float(), y_peft.float(), **(tol or TOL[dtype]))
    grad_out = torch.randn_like(y_ours)
    y_ours.backward(grad_out)
    y_peft.backward(grad_out.to(y_peft.dtype))
    for name in names:
        mine = getattr(ours.proj, name)["default"].weight.grad
        reference = getattr(theirs.proj, name)["default"].weight.grad
        scale = reference.float().abs().max().clamp(min=1e-6)
        torch.testing.assert_close(mine.float() / scale, reference.float() / scale, **(tol or TOL[dtype]))


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A deep copy of the state dict, for bit-identity checks."""
    return {k: v.detach().clone() for k, v in copy.copy(model.state_dict()).items()}


def assert_same_state(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys(), sorted(set(before) ^ set(after))
    for key in before:
        assert before[key].dtype == after[key].dtype, key
        assert torch.equal(before[key], after[key]), f"{key} changed"
