"""Unquantized layers: `nn.Linear`, and transformers' `Conv1D` (GPT-2), whose weight is (in, out)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from qlora_inject.quantize import linear_from
from qlora_inject.registry import BackendBase, class_is


def is_conv1d(module: nn.Module) -> bool:
    """transformers' `Conv1D`: a linear layer storing its weight transposed, as (in, out)."""
    return class_is(module, "Conv1D", "transformers")


class DenseBackend(BackendBase):
    """`nn.Linear` and `Conv1D`: the weight is the dense weight."""

    name = "dense"
    quant_names = ("none",)
    saved_by_transformers = True

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

    def requantize(self, module: nn.Module, weight: Tensor) -> nn.Module:
        self.check_weight_shape(module, weight)
        new = copy.deepcopy(module)
        with torch.no_grad():
            new.weight.copy_(weight.t() if is_conv1d(module) else weight)
        return new

    def quantizer_summary(self, quant: str, group_size: int) -> str:
        return "not quantized"

    def quantize(self, linear: nn.Linear, quant: str, *, compute_dtype: torch.dtype = torch.float32,
                 group_size: int = 64, bits: int = 4, device: str | torch.device = "cpu") -> nn.Module:
        """The `none` format: a dense copy of `linear` in `compute_dtype`."""
        bias = None if linear.bias is None else linear.bias.detach()
        return linear_from(linear.weight.detach(), bias, compute_dtype, device)

    def load_causal_lm(self, path, quant: str, *, compute_dtype: torch.dtype = torch.float32,
                       dtype: torch.dtype | None = None, shardable: bool = False, group_size: int | None = None):
        """The model as stored (in `dtype` where given)."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, **({} if dtype is None else {"dtype": dtype}))
