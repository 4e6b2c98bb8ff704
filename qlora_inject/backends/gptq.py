"""GPTQ layers: GPTQModel's `*QuantLinear`/`TorchLinear` family, auto-gptq's `QuantLinear*`, and look-alikes.

Buffers `qweight` (in·b/32, out), `qzeros` (groups, out·b/32), `scales` (groups, out), `g_idx` (in,).
Zero points: auto-gptq modules and GPTQ checkpoints store `zero − 1` ("v1"); GPTQModel's kernels that
declare `REQUIRES_FORMAT_V2` hold true zeros in memory (it converts when it loads). Kernels that
cannot train (exllama, marlin, machete, bitblas…: `SUPPORTS_TRAINING = False`) keep their own
forward in inference; while training, the base runs as dequantize + matmul instead, said once.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from qlora_inject.kernels.dequant_gptq import dequantize_gptq
from qlora_inject.kernels.dequant_matmul import dequantized_linear
from qlora_inject.quantize import float_copy, linear_from, rtn_groupwise
from qlora_inject.registry import BackendBase, class_is

GPTQ_BUFFERS = ("qweight", "qzeros", "scales", "g_idx")


def is_gptqmodel_layer(module: nn.Module) -> bool:
    return class_is(module, "BaseQuantLinear", "gptqmodel")


def methods_of(module: nn.Module) -> frozenset[str]:
    """GPTQModel's quantization methods for this class, lower-cased names (e.g. {"gptq"})."""
    methods = getattr(type(module), "SUPPORTS_METHODS", ()) or ()
    return frozenset(str(getattr(m, "value", m)).lower() for m in methods)


def can_train(module: nn.Module) -> bool:
    """False for inference-only kernels (GPTQModel's `SUPPORTS_TRAINING = False`)."""
    return bool(getattr(type(module), "SUPPORTS_TRAINING", True))


def run_or_fall_back(module: nn.Module, x: Tensor, backend) -> Tensor:
    """The module's own forward, unless it is an inference-only kernel asked for gradients."""
    if can_train(module) or not (torch.is_grad_enabled() and (x.requires_grad or module.training)):
        return module(x)
    if not getattr(module, "_qlora_inject_warned", False):
        warnings.warn(
            f"{type(module).__name__} is an inference-only kernel; while training, its base output is computed "
            "as x · dequantize(W)ᵀ in PyTorch instead (slower; load the model with a trainable kernel, e.g. "
            "GPTQModel's BACKEND.TORCH, to avoid this)", UserWarning, stacklevel=4,
        )
        module._qlora_inject_warned = True
    return dequantized_linear(x, lambda: backend.dequantize(module), getattr(module, "bias", None))


class GptqBackend(BackendBase):
    """GPTQ at 2, 3, 4 and 8 bits, any group size, act-order `g_idx`, v1 or v2 zero points."""

    name = "gptq"
    quant_names = ("gptq",)
    package = "gptqmodel"
    install = "pip install 'qlora-inject[gptq]'"

    def matches(self, module: nn.Module) -> bool:
        if is_gptqmodel_layer(module):
            return "gptq" in methods_of(module) and all(hasattr(module, b) for b in GPTQ_BUFFERS)
        return all(isinstance(getattr(module, b, None), Tensor) for b in GPTQ_BUFFERS)

    def zero_offset(self, module: nn.Module) -> int:
        """1 when the module stores `zero − 1` (v1), 0 for true zeros (v2)."""
        if is_gptqmodel_layer(module):
            return 0 if getattr(type(module), "REQUIRES_FORMAT_V2", False) else 1
        return 1                                                             # auto-gptq and checkpoints: v1

    def dequantize(self, module: nn.Module, out: Tensor | None = None) -> Tensor:
        return dequantize_gptq(module.qweight, module.qzeros, module.scales, module.g_idx, module.bits,
                               module.in_features, module.out_features, self.zero_offset(module), out=out)

    def forward(self, module: nn.Module, x: Tensor) -> Tensor:
        return run_or_fall_back(module, x, self)

    def quantizer_summary(self, quant: str, group_size: int) -> str:
        return f"GPTQ 4-bit, groups of {group_size}: round-to-nearest, no calibration"

    def quantize(self, linear: nn.Linear, quant: str, *, compute_dtype: torch.dtype = torch.float32,
                 group_size: int = 128, bits: int = 4, device: str | torch.device = "cpu") -> nn.Module:
        """A GPTQModel `TorchLinear` (symmetric, round-to-nearest: no calibration) of `linear`'s weight."""
        return gptq_linear(linear, bits=bits, group_size=group_size).to(device)

    def requantize(self, module: nn.Module, weight: Tensor) -> nn.Module:
        """A GPTQModel `TorchLinear` with `module`'s bits, groups (same `g_idx`) and symmetry, holding `weight`."""
        self.check_weight_shape(module, weight)
        source = linear_from(weight, getattr(module, "bias", None))
        group_size = getattr(module, "requested_group_size", None) or module.group_size
        return gptq_linear(source, bits=module.bits, group_size=group_size, sym=bool(getattr(module, "sym", True)),
                           desc_act=bool(getattr(module, "desc_act", False)), g_idx=module.g_idx.cpu()
                           ).to(module.qweight.device)


def gptq_linear(linear: nn.Linear, bits: int = 4, group_size: int = 128, sym: bool = True, desc_act: bool = False,
                g_idx: torch.Tensor | None = None) -> nn.Module:
    """A GPTQModel `TorchLinear` (true zero points, trainable on every device) packed by GPTQModel."""
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    in_features, out_features = linear.in_features, linear.out_features
    if g_idx is None:
        g_idx = torch.arange(in_features, dtype=torch.int32) // (in_features if group_size == -1 else group_size)
    scales, zeros, _ = rtn_groupwise(linear.weight.detach(), bits, g_idx, sym)
    layer = TorchLinear(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, in_features=in_features,
                        out_features=out_features, bias=linear.bias is not None, pack_dtype=torch.int32)
    with torch.no_grad():
        layer.pack_original(float_copy(linear), scales, zeros, g_idx.to(torch.int32))
    layer.optimized = True                                   # no torch.compile of its dequantizer
    layer.post_init()
    return layer
