"""HQQ layers (`hqq.core.quantize.HQQLinear`): packed codes in `W_q`, zero/scale in the `meta` dict.

Recognised by class name along the MRO, or by carrying `W_q` and a `meta` dict. The base forward is
the module's own: its default PyTorch backend dequantizes and matmuls, and gradients flow to the
input, so it trains on every device.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qlora_inject.kernels.dequant_hqq import dequantize_hqq
from qlora_inject.quantize import float_copy
from qlora_inject.registry import BackendBase, class_is


class HqqBackend(BackendBase):
    """`HQQLinear`, 1–8 bits, either axis, quantized or offloaded meta data."""

    name = "hqq"
    quant_names = ("hqq",)
    package = "hqq"
    install = "pip install 'qlora-inject[hqq]'"

    def matches(self, module: nn.Module) -> bool:
        return class_is(module, "HQQLinear", "hqq") or (
            hasattr(module, "W_q") and isinstance(getattr(module, "meta", None), dict)
        )

    def features(self, module: nn.Module) -> tuple[int, int]:
        meta = module.meta
        if meta is None:
            raise ValueError(
                f"{type(module).__name__} has not been quantized yet (meta is None); "
                "quantize it (HQQLinear(linear, quant_config, ...)) before injecting LoRA"
            )
        out_features, in_features = meta["shape"]
        return in_features, out_features

    def compute_dtype(self, module: nn.Module) -> torch.dtype | None:
        return getattr(module, "compute_dtype", None) or module.meta.get("compute_dtype")

    def dequantize(self, module: nn.Module, out: Tensor | None = None) -> Tensor:
        return dequantize_hqq(module.W_q, module.meta, out=out)                    # (out, in), compute dtype

    def quantizer_summary(self, quant: str, group_size: int) -> str:
        return f"HQQ 4-bit, groups of {group_size}, its data-free optimizer"

    def quantize(self, linear: nn.Linear, quant: str, *, compute_dtype: torch.dtype = torch.float32,
                 group_size: int = 64, bits: int = 4, device: str | torch.device = "cpu") -> nn.Module:
        """An `HQQLinear` (`bits`, `group_size`, hqq's own optimizer) of `linear`'s weight."""
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        return HQQLinear(float_copy(linear), BaseQuantizeConfig(nbits=bits, group_size=group_size),
                         compute_dtype=compute_dtype, device=str(device))

    def requantize(self, module: nn.Module, weight: Tensor) -> nn.Module:
        try:
            from hqq.core.quantize import HQQLinear
        except ImportError as err:
            raise ImportError(f"requantizing an HQQ layer needs hqq: {self.install}") from err
        self.check_weight_shape(module, weight)
        config = dict(module.quant_config, offload_meta=bool(module.offload_meta))
        device = module.W_q.device
        return HQQLinear.from_weights(
            weight.detach().to(device), None if module.bias is None else nn.Parameter(module.bias.detach().clone()),
            config, compute_dtype=module.compute_dtype, device=str(device), del_orig=True,
        )
