"""Adapter variants: how one adapter's update enters a `LoraLinear`. This file: plain LoRA.

    y = result + s · B A dropout(x)          ΔW = s · B A          (result: the base output so far)

A variant is one small object per adapter, resolved once when the adapter is added
(`LoraLinear.build_adapter`) and kept in `LoraLinear.lora_variant[name]`. The layer asks it, never
checks which variant an adapter is:

- `init`: the adapter's extra modules beyond `lora_A`/`lora_B`/`lora_dropout`, by table name;
- `forward`: the base output plus this adapter's term;
- `merged_weight`: a dense weight with this adapter folded in;
- `fusable`: whether its term is s·B A drop(x) alone, so it can run inside the fused op
  (`kernels/fused_lora.py`) and the gathered mixed batch; `combinable`: whether ΔW = s·B A adds up
  with other adapters' (`add_weighted_adapter`);
- `saved_keys`: what it saves, PEFT's key → the layer's state-dict key.

Plain LoRA is this class; DoRA (`dora.py`) is the other built-in. A new variant is a new file with a
subclass, and one line in `LoraLinear.build_adapter` that picks it from the config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from qlora_inject.lora import AdapterSpec, LoraLinear


class LoraVariant:
    """Plain LoRA: the term s · B A dropout(x)."""

    name = "lora"
    fusable = True
    combinable = True

    def init(self, layer: LoraLinear, spec: AdapterSpec, lora_A: nn.Linear, lora_B: nn.Linear,
             base: nn.Module) -> dict[str, nn.Module]:
        """The adapter's extra modules by `LoraLinear` table name (none for plain LoRA); `base` is the base
        layer the adapter will sit on (a PiSSA/OLoRA/LoftQ start replaces it)."""
        return {}

    def forward(self, layer: LoraLinear, name: str, result: Tensor, x: Tensor, dtype: torch.dtype) -> Tensor:
        """`result` (the base output, plus earlier adapters' terms) plus this adapter's term, run in `dtype`."""
        weight_A, weight_B, scaling = layer.factors(name)
        weight_A, weight_B = weight_A.to(dtype), weight_B.to(dtype)              # (r, in), (out, r)
        hidden = F.linear(layer.lora_dropout[name](x.to(dtype)), weight_A)    # (…, r)
        if result.dtype == dtype:
            # result + s·hidden·Bᵀ in one pass over the output.
            flat = torch.addmm(result.reshape(-1, layer.out_features), hidden.reshape(-1, hidden.shape[-1]),
                               weight_B.t(), alpha=scaling)                  # (tokens, out)
            return flat.view(result.shape)
        return result + (F.linear(hidden, weight_B) * scaling).to(result.dtype)

    def merged_weight(self, layer: LoraLinear, name: str, weight: Tensor) -> Tensor:
        """`weight` (dense, fp32, a copy the caller owns) with this adapter folded in: W + s·B A."""
        return weight.add_(layer.delta_weight(name).to(weight.device))

    def saved_keys(self, name: str) -> dict[str, str]:
        """PEFT's key (adapter name removed) → the layer's state-dict key, for each tensor this adapter saves."""
        return {f"{table}.weight": f"{table}.{name}.weight" for table in ("lora_A", "lora_B")}
