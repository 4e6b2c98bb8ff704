"""AWQ layers: AutoAWQ's `WQLinear_GEMM` / `WQLinear_GEMV`, and GPTQModel's AWQ kernels.

GEMM layout: `qweight` (in, out·b/32) and `qzeros` (groups, out·b/32) packed along out_features,
nibbles in the order [0, 2, 4, 6, 1, 3, 5, 7] at 4 bits; `scales` (groups, out). GEMV layout
(AutoAWQ): `qweight` (out, in·b/32) packed along in_features in natural order, `qzeros` and
`scales` per (out, group), padded. Zero points are stored as is.

AutoAWQ's modules cannot run backward on a CPU (its GEMM picks a Triton kernel, GEMV needs a
compiled extension), and GPTQModel's AWQ torch kernel rewrites its own `scales`/`bias` into the
input's dtype when called: so the base output is computed here, as x · dequantize(W)ᵀ + bias, on
CUDA too for AutoAWQ, which keeps the frozen base bit-identical. The layout self-check compares
against the library's own dequantization (AutoAWQ) or its forward in the scales' dtype (GPTQModel).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qlora_inject.backends.gptq import can_train, is_gptqmodel_layer, methods_of
from qlora_inject.kernels.dequant_gptq import dequantize_awq_gemm, dequantize_awq_gemv
from qlora_inject.kernels.dequant_matmul import dequantized_linear
from qlora_inject.quantize import float_copy, linear_from, rtn_groupwise
from qlora_inject.registry import BackendBase, class_is


def _is_gemv(module: nn.Module) -> bool:
    return class_is(module, "WQLinear_GEMV", "awq") or (
        not is_gptqmodel_layer(module) and module.qweight.shape[0] == module.out_features
        and module.qweight.shape[0] != module.in_features
    )


def _bits(module: nn.Module) -> int:
    return int(getattr(module, "w_bit", None) or module.bits)


class AwqBackend(BackendBase):
    """AWQ at 2–8 bits (GPTQModel) or 4 bits (AutoAWQ), GEMM and GEMV layouts."""

    name = "awq"
    quant_names = ("awq",)
    package = "gptqmodel"
    install = "pip install 'qlora-inject[gptq]'"

    def matches(self, module: nn.Module) -> bool:
        if is_gptqmodel_layer(module):
            return "awq" in methods_of(module) and hasattr(module, "qweight")
        if class_is(module, "WQLinear_GEMM", "awq") or class_is(module, "WQLinear_GEMV", "awq"):
            return True
        return (all(isinstance(getattr(module, b, None), Tensor) for b in ("qweight", "qzeros", "scales"))
                and getattr(module, "g_idx", None) is None and hasattr(module, "in_features"))

    def dequantize(self, module: nn.Module, out: Tensor | None = None) -> Tensor:
        bits = _bits(module)
        if _is_gemv(module):
            return dequantize_awq_gemv(module.qweight, module.qzeros, module.scales, bits, module.group_size,
                                       module.in_features)
        return dequantize_awq_gemm(module.qweight, module.qzeros, module.scales, bits, module.group_size,
                                   module.out_features, interleaved=bits == 4, out=out)

    def forward(self, module: nn.Module, x: Tensor) -> Tensor:
        return dequantized_linear(x, lambda: self.dequantize(module), getattr(module, "bias", None))

    def module_forward_rtol(self, module: nn.Module, dtype: torch.dtype) -> float:
        """The base output here is x·dequantize(W)ᵀ + b in the input's dtype, from the untouched scales. The
        modules' own forwards compute in half precision (GPTQModel's `AwqTorchLinear`: fp32 inputs in fp16,
        after rewriting its own scales and bias to that dtype; AutoAWQ's kernels in fp16), so the two differ
        by that dtype's rounding: its machine epsilon, relative."""
        own = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16
        return torch.finfo(own).eps

    def reference_forward(self, module: nn.Module, x: Tensor) -> Tensor:
        """The owning library's own computation, for the layout self-check."""
        if is_gptqmodel_layer(module) and can_train(module):
            return copy.deepcopy(module)(x).to(x.dtype)                      # a copy: its forward rewrites scales
        if class_is(module, "WQLinear_GEMM", "awq"):
            from awq.utils.packing_utils import dequantize_gemm

            weight = dequantize_gemm(module.qweight, module.qzeros, module.scales, _bits(module), module.group_size)
            bias = getattr(module, "bias", None)
            return F.linear(x, weight.t().to(x.dtype), None if bias is None else bias.to(x.dtype))
        return self.forward(module, x)

    def quantizer_summary(self, quant: str, group_size: int) -> str:
        return f"AWQ 4-bit, groups of {group_size}: round-to-nearest, no calibration"

    def quantize(self, linear: nn.Linear, quant: str, *, compute_dtype: torch.dtype = torch.float32,
                 group_size: int = 128, bits: int = 4, device: str | torch.device = "cpu") -> nn.Module:
        """A GPTQModel `AwqTorchLinear` (asymmetric, round-to-nearest: no activation-aware scaling) of `linear`."""
        return awq_linear(linear, bits=bits, group_size=group_size).to(device)

    def requantize(self, module: nn.Module, weight: Tensor) -> nn.Module:
        """A GPTQModel `AwqTorchLinear` with `module`'s bits and group size, holding `weight`."""
        self.check_weight_shape(module, weight)
        source = linear_from(weight, getattr(module, "bias", None))
        return awq_linear(source, bits=_bits(module), group_size=module.group_size).to(module.qweight.device)


def awq_linear(linear: nn.Linear, bits: int = 4, group_size: int = 128) -> nn.Module:
    """A GPTQModel `AwqTorchLinear` (GEMM layout, trainable on every device) packed by GPTQModel."""
    from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear

    in_features, out_features = linear.in_features, linear.out_features
    size = in_features if group_size == -1 else group_size
    groups = torch.arange(in_features) // size
    scales, zeros, dequantized = rtn_groupwise(linear.weight.detach(), bits, groups, sym=False)
    source = float_copy(linear)
    with torch.no_grad():
        source.weight.copy_(dequantized)                     # AWQ's pack does not clamp: give it the grid values
    layer = AwqTorchLinear(bits=bits, group_size=group_size, sym=False, desc_act=False, in_features=in_features,
                           out_features=out_features, bias=linear.bias is not None, register_buffers=True)
    with torch.no_grad():
        layer.pack(source, scales, zeros)
    layer.post_init()
    return layer
