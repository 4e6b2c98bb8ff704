"""`LoraLinear`: a frozen (possibly quantized) base layer plus low-rank adapters.

    y = base(x) + Σ_{a ∈ active} s_a · B_a A_a dropout_a(x),   s_a = α_a / r_a  (or α_a / √r_a, rsLoRA)

`base` is the original module object, kept as `base_layer`, so its quantizer state (bitsandbytes'
`quant_state`/`SCB`, HQQ's `meta`, GPTQ/AWQ buffers) is carried over untouched. `A_a` is r × in,
`B_a` is out × r, both `nn.Linear` without bias in `lora_A[a]` / `lora_B[a]`: PEFT's names, so
state-dict keys match PEFT's and adapter files need no key mapping.

The adapter path runs in a compute dtype (the base layer's by default, fp16/bf16 on GPU) while the
adapter parameters may be stored in fp32; the LoRA term is added into the base output with one
`addmm` when dtypes allow, so no extra passes are made over the (tokens × out) tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qlora_inject.registry import Backend


@dataclass
class AdapterSpec:
    """Everything that defines one adapter on one layer."""

    r: int
    lora_alpha: float
    lora_dropout: float = 0.0
    init_lora_weights: bool | str = True
    use_rslora: bool = False
    adapter_dtype: torch.dtype | None = torch.float32
    compute_dtype: torch.dtype | None = None                                 # None: the base's

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraLinear(nn.Module):
    """A base layer of any registered format with named LoRA adapters on top.

    Args:
        base_layer: The module to wrap; kept as is (same object) and never modified.
        backend: The format backend that handles `base_layer`.
    """

    def __init__(self, base_layer: nn.Module, backend: Backend) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.backend = backend
        self.in_features, self.out_features = backend.features(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_compute_dtype: dict[str, torch.dtype | None] = {}
        self.active_adapters: list[str] = []
        self.disable_adapters = False

    # --- PEFT-familiar views of the base ------------------------------------------------------

    @property
    def weight(self) -> Tensor:
        """The base layer's (possibly quantized) weight, for code that inspects `module.weight`."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def device(self) -> torch.device:
        for tensor in (*self.base_layer.parameters(), *self.base_layer.buffers()):
            return tensor.device
        return torch.device("cpu")

    # --- adapters -------------------------------------------------------------------------------

    def build_adapter(self, spec: AdapterSpec) -> nn.ModuleDict:
        """Create (but do not attach) the modules of one adapter, on the base layer's device.

        Kept apart from `attach_adapter` so injection can build every adapter first and attach
        them only when all succeeded.
        """
        device = self.device
        dtype = spec.adapter_dtype or self.backend.compute_dtype(self.base_layer) or torch.float32
        lora_A = nn.Linear(self.in_features, spec.r, bias=False, device=device, dtype=dtype)  # (r, in)
        lora_B = nn.Linear(spec.r, self.out_features, bias=False, device=device, dtype=dtype)  # (out, r)
        if spec.init_lora_weights is True:
            nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(lora_B.weight)
        elif spec.init_lora_weights == "gaussian":
            nn.init.normal_(lora_A.weight, std=1 / spec.r)
            nn.init.zeros_(lora_B.weight)
        # init_lora_weights=False keeps nn.Linear's random init for both: the adapter is not a no-op.
        dropout = nn.Dropout(spec.lora_dropout) if spec.lora_dropout > 0 else nn.Identity()
        return nn.ModuleDict({"lora_A": lora_A, "lora_B": lora_B, "lora_dropout": dropout})

    def attach_adapter(self, adapter_name: str, spec: AdapterSpec, parts: nn.ModuleDict) -> None:
        """Register modules built by `build_adapter` under `adapter_name`."""
        self.lora_A[adapter_name] = parts["lora_A"]
        self.lora_B[adapter_name] = parts["lora_B"]
        self.lora_dropout[adapter_name] = parts["lora_dropout"]
        self.r[adapter_name] = spec.r
        self.lora_alpha[adapter_name] = spec.lora_alpha
        self.scaling[adapter_name] = spec.scaling
        self.lora_compute_dtype[adapter_name] = spec.compute_dtype or self.backend.compute_dtype(self.base_layer)

    def update_layer(self, adapter_name: str, spec: AdapterSpec) -> None:
        """Add one adapter (build and attach)."""
        if adapter_name in self.lora_A:
            raise ValueError(f"adapter {adapter_name!r} already exists on this layer")
        self.attach_adapter(adapter_name, spec, self.build_adapter(spec))

    def set_adapter(self, adapter_names: list[str]) -> None:
        """Make `adapter_names` the active adapters; only their parameters train."""
        self.active_adapters = list(adapter_names)
        for name in self.lora_A:
            trainable = name in self.active_adapters
            self.lora_A[name].weight.requires_grad_(trainable)
            self.lora_B[name].weight.requires_grad_(trainable)

    # --- forward --------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        result = self.backend.forward(self.base_layer, x)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name in self.lora_A:
                result = self._add_lora(result, x, name)
        return result

    def _add_lora(self, result: Tensor, x: Tensor, name: str) -> Tensor:
        dtype = self.lora_compute_dtype[name] or x.dtype
        weight_A = self.lora_A[name].weight.to(dtype)                         # (r, in)
        weight_B = self.lora_B[name].weight.to(dtype)                         # (out, r)
        hidden = F.linear(self.lora_dropout[name](x.to(dtype)), weight_A)    # (…, r)
        if result.dtype == dtype:
            # result + s·hidden·Bᵀ in one pass over the output.
            flat = torch.addmm(result.reshape(-1, self.out_features), hidden.reshape(-1, hidden.shape[-1]),
                               weight_B.t(), alpha=self.scaling[name])       # (tokens, out)
            return flat.view(result.shape)
        return result + (F.linear(hidden, weight_B) * self.scaling[name]).to(result.dtype)

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.r[n]} alpha={self.lora_alpha[n]}" for n in self.lora_A)
        return f"backend={self.backend.name}, in_features={self.in_features}, out_features={self.out_features}, {ranks}"
