"""Fused RMSNorm and SwiGLU for Llama-family decoder layers (Llama, Mistral, Qwen2, …).

    from qlora_inject import fuse_llama_ops
    report = fuse_llama_ops(model)           # before or after LoraModel(...); undo with unfuse_llama_ops

Each RMSNorm (`y = w · x / sqrt(mean(x²) + ε)`) and each gated MLP (`y = down(silu(gate(x)) · up(x))`)
is swapped for a module that computes the same as one autograd op per norm and per gate
(`kernels.rms_norm`, `kernels.swiglu`): fewer passes over the activations, and less kept for the
backward — per layer, in a bf16 model, one (tokens × intermediate) tensor fewer for the MLP and a
bf16 instead of an fp32 copy of the input for each norm.

A module is swapped only when it has the attributes of one (`weight` and `variance_epsilon`;
`gate_proj`, `up_proj`, `down_proj` and an `act_fn`) and its own forward gives the fused one's
output on a probe input (two random rows): a look-alike with other numerics (Gemma's `1 + w`, a GELU
gate) is left as it is and named in the report. The swapped modules hold the very same parameters and
children under the same names, so state dicts, adapters and checkpoints are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from qlora_inject.kernels.rms_norm import rms_norm
from qlora_inject.kernels.swiglu import swiglu, swiglu_forward_torch
from qlora_inject.registry import find_backend

PROBE_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}   # relative, on the probe


class FusedRMSNorm(nn.Module):
    """A Llama-style RMSNorm computed by `rms_norm`; holds the original module's weight."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.weight = original.weight
        self.variance_epsilon = float(original.variance_epsilon)
        self.training = original.training
        object.__setattr__(self, "original", original)                     # for unfuse; not a submodule

    def forward(self, hidden_states: Tensor) -> Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class FusedGatedMLP(nn.Module):
    """A gated MLP, `down(swiglu(gate(x), up(x)))`; takes over the original's three projections."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = original.gate_proj, original.up_proj, original.down_proj
        self.training = original.training
        object.__setattr__(self, "original", original)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if gate.shape != up.shape or gate.dtype != up.dtype:                # projections of unlike formats
            return self.down_proj(swiglu_forward_torch(gate, up))
        return self.down_proj(swiglu(gate, up))


@dataclass
class FusionReport:
    """What `fuse_llama_ops` swapped, and what looked alike but was left alone (name → why)."""

    norms: list[str] = field(default_factory=list)
    mlps: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"fused {len(self.norms)} RMSNorm and {len(self.mlps)} gated MLP modules"]
        lines += [f"  left {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _looks_like_rms_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (isinstance(weight, Tensor) and weight.dim() == 1 and weight.is_floating_point()
            and isinstance(getattr(module, "variance_epsilon", None), float) and not isinstance(module, FusedRMSNorm))


def _looks_like_gated_mlp(module: nn.Module) -> bool:
    parts = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    return (all(isinstance(part, nn.Module) for part in parts) and callable(getattr(module, "act_fn", None))
            and not isinstance(module, FusedGatedMLP))                      # the probe tells a SiLU gate


def _probe_disagrees(original: nn.Module, fused: nn.Module, width: int, dtype: torch.dtype,
                     device: torch.device) -> str | None:
    """Why `fused` is not a stand-in for `original` on two random rows, or None when it is."""
    probe = torch.randn(2, width, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    modes = {module: module.training for module in original.modules()}
    # bitsandbytes repacks a bare 4-bit layer in place on its first eval-mode forward on AVX512-BF16 CPUs
    # (other bits, and a backward autograd does not know): the probe must leave every layer as it was.
    repacking = [m for m in original.modules() if getattr(m, "support_avx512bf16_for_cpu", False)]
    original.eval()                                                       # no dropout: both see the same layers
    for module in repacking:
        module.support_avx512bf16_for_cpu = False
    try:
        with torch.no_grad():
            expected, got = original(probe), fused(probe)
    except Exception as err:                                              # e.g. a layer that wants other input
        return f"its forward failed on a probe ({type(err).__name__}: {err})"
    finally:
        for module, training in modes.items():
            module.training = training
        for module in repacking:
            module.support_avx512bf16_for_cpu = True
    if not isinstance(expected, Tensor) or expected.shape != got.shape:
        return "its forward returns something else than one tensor of the probe's shape"
    scale = expected.float().abs().max().clamp_min(1e-6)
    error = (expected.float() - got.float()).abs().max() / scale
    if error > PROBE_TOLERANCE.get(dtype, 2e-2):
        return f"its forward differs from the fused one by {error:.2e} (relative) on a probe: other numerics"
    return None


def _input_dtype(model: nn.Module) -> torch.dtype:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return weight.dtype if isinstance(weight, Tensor) and weight.is_floating_point() else torch.float32


def fuse_llama_ops(model: nn.Module) -> FusionReport:
    """Swap every Llama-style RMSNorm and SiLU-gated MLP in `model` for its fused twin, in place.

    Works on a plain transformers model or on one wrapped by `LoraModel` (before or after the
    adapters go in), on every quantized format. Returns what was swapped and what was left.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_llama_ops expects a torch.nn.Module, got {type(model).__name__}")
    report = FusionReport()
    dtype = _input_dtype(model)
    swaps: list[tuple[nn.Module, str, nn.Module, list[str], str]] = []
    for name, module in model.named_modules():
        if not name:                                                      # the model itself has no parent to swap in
            continue
        if _looks_like_rms_norm(module):
            fused, kind, width = FusedRMSNorm(module), report.norms, module.weight.shape[0]
            probe_dtype, device = module.weight.dtype, module.weight.device
        elif _looks_like_gated_mlp(module):
            fused, kind = FusedGatedMLP(module), report.mlps
            width, probe_dtype = _in_features(module.gate_proj), dtype
            device = next((p.device for p in module.parameters()), torch.device("cpu"))
            if width is None:
                report.skipped[name] = "its gate_proj has no in_features"
                continue
        else:
            continue
        if hasattr(module, "_hf_hook"):                                   # accelerate's offload/dispatch hook
            report.skipped[name] = "it carries an accelerate hook (device_map offloading), which a swap would drop"
            continue
        why = _probe_disagrees(module, fused, width, probe_dtype, device)
        if why is not None:
            report.skipped[name] = why
            continue
        parent_name, _, child = name.rpartition(".")
        swaps.append((model.get_submodule(parent_name), child, fused, kind, name))
    for parent, child, fused, kind, name in swaps:                       # all probes first: no half-fused model
        setattr(parent, child, fused)
        kind.append(name)
    return report


def unfuse_llama_ops(model: nn.Module) -> int:
    """Put the original modules back, holding the fused ones' current weight and projections (adapters
    included, parameters replaced since the swap too); returns how many."""
    restored = []
    for name, module in model.named_modules():
        if isinstance(module, (FusedRMSNorm, FusedGatedMLP)):
            parts = ("gate_proj", "up_proj", "down_proj") if isinstance(module, FusedGatedMLP) else ("weight",)
            for part in parts:
                setattr(module.original, part, getattr(module, part))
            restored.append((name, module.original))
    for name, original in restored:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, original)
    return len(restored)


def _in_features(layer: nn.Module) -> int | None:
    """Input width of a projection: a wrapper's or `nn.Linear`'s own, else its format backend's."""
    if isinstance(getattr(layer, "in_features", None), int):
        return layer.in_features
    backend = find_backend(layer)
    return None if backend is None else backend.features(layer)[0]
