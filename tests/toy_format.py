"""A made-up weight format, added the way a user adds one: one file, one `register_backend` call.

Symmetric 4-bit with one fp32 scale per output row, two codes per byte along the input:
W[o, i] = (code[o, i] - 8) · scale[o]. Nothing in the library names it; the tests check that the
command line, `quantize_model`, `inspect`, the benchmark and the format-parametrised tests find it.

Used as a pytest plugin (`pytest -p toy_format`, with tests/ on the path) it is registered for the
whole run, so every test parametrised over the registry's formats runs on it too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qlora_inject import BackendBase, register_backend, unregister_backend

NAME = "toy4"


class ToyInt4Linear(nn.Module):
    """A 4-bit layer with per-row scales, not an `nn.Linear`: `packed` (out, in/2) uint8, `scale` (out,)."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        weight = weight.detach().float()
        self.out_features, self.in_features = weight.shape
        scale = (weight.abs().amax(dim=1) / 7).clamp(min=1e-8)
        codes = (torch.round(weight / scale[:, None]).clamp(-8, 7) + 8).to(torch.uint8)
        self.register_buffer("packed", codes[:, 0::2] | (codes[:, 1::2] << 4))
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def dense_weight(self) -> Tensor:
        codes = torch.stack((self.packed & 15, self.packed >> 4), dim=-1).reshape(self.out_features, -1)
        return (codes.float() - 8) * self.scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dense_weight().to(x.dtype), bias)


class ToyInt4Backend(BackendBase):
    """The toy format's facts: what the base class does not give by default."""

    name = "toy-int4"
    quant_names = (NAME,)

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, ToyInt4Linear)

    def dequantize(self, module: nn.Module, out: Tensor | None = None) -> Tensor:
        weight = module.dense_weight()
        if out is None:
            return weight
        return out.view(weight.shape).copy_(weight)

    def requantize(self, module: nn.Module, weight: Tensor) -> nn.Module:
        self.check_weight_shape(module, weight)
        return ToyInt4Linear(weight, module.bias)

    def quantize(self, linear: nn.Linear, quant: str, *, compute_dtype: torch.dtype = torch.float32,
                 group_size: int = 64, bits: int = 4, device: str | torch.device = "cpu") -> nn.Module:
        return ToyInt4Linear(linear.weight, linear.bias).to(device)


def register() -> ToyInt4Backend:
    return register_backend(ToyInt4Backend())


def unregister() -> None:
    unregister_backend(ToyInt4Backend.name)


def pytest_configure(config) -> None:                        # as a plugin: registered before collection
    register()
