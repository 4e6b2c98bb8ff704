"""Unquantized layers: `nn.Linear`, and transformers' `Conv1D` (GPT-2), whose weight is (in, out)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from qlora_inject.registry import class_is


def is_conv1d(module: nn.Module) -> bool:
    """transformers' `Conv1D`: a linear layer storing its weight transposed, as (in, out)."""
    return class_is(module, "Conv1D", "transformers")


class DenseBackend:
    """`nn.Linear` and `Conv1D`: the weight is the dense weight."""

    name = "dense"
    fused = True                              # x·dequantize(W)ᵀ + b is its forward: train through the fused op

    def matches(self, module: nn.Module) -> bool:
        # A Linear whose weight is a Parameter subclass (Params4bit, Int8Params, …) is quantized.
        return is_conv1d(module) or (isinstance(module, nn.Linear) and type(module.weight) is nn.Parameter)

    def features(self, module: nn.Module) -> tuple[int, int]:
        if is_conv1d(module):
            in_features, out_features = module.weight.shape
            return in_features, out_features
        return module.in_features, module.out_features

    def compute_dtype(self, module: nn.Module) -> torch.dtype | None:
        return module.weight.dtype

    def dequantize(self, module: nn.Module, out: Tensor | None = None) -> Tensor:
        weight = module.weight.detach()                                     # the weight itself: `out` is not needed
        return weight.t() if is_conv1d(module) else weight                  # (out, in)

    def forward(self, module: nn.Module, x: Tensor) -> Tensor:
        return module(x)

    def requantize(self, module: nn.Module, weight: Tensor) -> nn.Module:
        in_features, out_features = self.features(module)
        if tuple(weight.shape) != (out_features, in_features):
            raise ValueError(
                f"weight of shape {tuple(weight.shape)} does not fit a {in_features}->{out_features} layer, "
                f"which needs ({out_features}, {in_features})"
            )
        new = copy.deepcopy(module)
        with torch.no_grad():
            new.weight.copy_(weight.t() if is_conv1d(module) else weight)
        return new
