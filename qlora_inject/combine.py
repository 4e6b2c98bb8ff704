"""`add_weighted_adapter`: a new adapter made from existing ones, ΔW_new ≈ Σ wᵢ·ΔWᵢ.

- `"cat"`: stack the factors (rank Σ rᵢ): exact.
- `"svd"`: take Σ wᵢ·sᵢ·Bᵢ Aᵢ per layer and keep its top `svd_rank` singular directions: exact
  when `svd_rank` reaches the rank of the sum.
- `"linear"`: PEFT's combination for adapters of one rank, A = Σ √(wᵢ sᵢ)·Aᵢ and B = Σ √(wᵢ sᵢ)·Bᵢ;
  exact for one adapter, an approximation (cross terms) for several.
The new adapter has scaling 1 (lora_alpha = r), so its factors carry the weights and scales.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from qlora_inject.config import LoraConfig
from qlora_inject.inject import adapter_names, inject
from qlora_inject.lora import LoraLinear
from qlora_inject.targeting import iter_modules

COMBINATIONS = ("linear", "cat", "svd")


def add_weighted_adapter(model: nn.Module, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None) -> LoraConfig:
    """Add `adapter_name` = Σ weights[i] · adapters[i] to every layer holding any of them; return its config."""
    existing = adapter_names(model)
    missing = [a for a in adapters if a not in existing]
    if missing or not adapters:
        raise ValueError(f"adapters {missing or adapters} are not in this model (adapters: {existing})")
    if len(weights) != len(adapters):
        raise ValueError(f"{len(weights)} weights for {len(adapters)} adapters; give one weight per adapter")
    bad = [w for w in weights if not isinstance(w, numbers.Real) or isinstance(w, bool) or not math.isfinite(w)]
    if bad:
        raise ValueError(f"weights={list(weights)!r} holds {bad[0]!r}; each weight must be a finite number "
                         "(not nan, inf or a string), e.g. weights=[0.7, 0.3]")
    if svd_rank is not None and (not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank <= 0):
        raise ValueError(f"svd_rank={svd_rank!r} must be a positive integer or None (the largest rank combined)")
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type={combination_type!r} is not one of {COMBINATIONS}")
    layers = {name: m for name, m in iter_modules(model)
              if isinstance(m, LoraLinear) and any(a in m.adapters for a in adapters)}
    held = {name: [a for a in adapters if a in layer.adapters] for name, layer in layers.items()}
    refused = {a: layers[name].variant(a).name for name, names in held.items() for a in names
               if not layers[name].variant(a).combinable}
    if refused:
        raise ValueError(f"adapters {refused} (adapter: variant) cannot be combined: their update is not s·B A "
                         "alone, so it does not add up with others'; merge them instead")
    ranks = {layers[name].rank(a) for name, names in held.items() for a in names}
    if combination_type == "linear" and len(ranks) > 1:
        raise ValueError(f"'linear' needs adapters of one rank, got ranks {sorted(ranks)}; use 'cat' or 'svd'")
    rank = {"linear": max(ranks),
            "cat": sum(max(layers[name].rank(a) if a in names else 0 for name, names in held.items())
                       for a in adapters),
            "svd": svd_rank or max(ranks)}[combination_type]
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(layers), init_lora_weights=False)
    factors = {name: _factors(layer, adapters, weights, combination_type, rank) for name, layer in layers.items()}
    inject(model, config, adapter_name)
    for name, (A, B) in factors.items():
        layers[name].load_factors(adapter_name, A, B)
    return config


def _factors(layer: LoraLinear, adapters: list[str], weights: list[float], kind: str, rank: int):
    present = [(a, w) for a, w in zip(adapters, weights, strict=True) if a in layer.adapters]
    if kind == "svd":
        delta = sum(w * layer.delta_weight(a) for a, w in present)                  # (out, in)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        root = S[:rank].sqrt()
        A = root[:, None] * Vh[:rank]
        B = U[:, :rank] * root[None, :]
        return _pad(A, rank, 0), _pad(B, rank, 1)
    factors = [(layer.factors(a), w) for a, w in present]                           # ((A, B, s), w)
    if kind == "linear":
        A = sum(math.sqrt(abs(w * s)) * A.float() for (A, _, s), w in factors)
        B = sum(math.copysign(math.sqrt(abs(w * s)), w) * B.float() for (_, B, s), w in factors)
        return A, B
    blocks_A = [A.float() for (A, _, _), _ in factors]                              # cat
    blocks_B = [w * s * B.float() for (_, B, s), w in factors]
    return _pad(torch.cat(blocks_A), rank, 0), _pad(torch.cat(blocks_B, dim=1), rank, 1)


def _pad(t: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """Zero-pad (or cut) the rank dimension to `rank`."""
    size = t.shape[dim]
    if size >= rank:
        return t.narrow(dim, 0, rank)
    pad = [0, 0, 0, 0]
    pad[1 if dim == 1 else 3] = rank - size
    return torch.nn.functional.pad(t, pad)
