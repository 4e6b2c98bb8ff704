"""`LoraLinear`: a frozen (possibly quantized) base layer plus low-rank adapters.

    y = base(x) + Σ_{a ∈ active} s_a · B_a A_a dropout_a(x),   s_a = α_a / r_a  (or α_a / √r_a, rsLoRA)

`base` is the original module object, kept as `base_layer`, so its quantizer state (bitsandbytes'
`quant_state`/`SCB`, HQQ's `meta`, GPTQ/AWQ buffers) is carried over untouched. `A_a` is r × in,
`B_a` is out × r, both `nn.Linear` without bias in `lora_A[a]` / `lora_B[a]`: PEFT's names, so
state-dict keys match PEFT's and adapter files need no key mapping. The term above is plain LoRA's;
each adapter has a variant object, chosen when it is added (`variant.py`: plain LoRA; `dora.py`:
DoRA), that computes its term, its merged weight and the tensors it saves, so the forward is a loop
over the active adapters asking each one's variant.

The adapter path runs in the wider of the adapter's compute dtype (the base layer's by default,
fp16/bf16 on GPU) and the output's dtype, while the adapter parameters may be stored in fp32; the
LoRA term is added to the base output in the output's dtype (the activations', as the quantized
module's own forward returns it), with one `addmm` when dtypes allow, so a small term is never
rounded at a half-precision compute dtype and no extra passes are made over the (tokens × out) tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qlora_inject import init_schemes
from qlora_inject.distributed import adapters_are_fsdp_units, base_trains, forward_through_adapter_units, remember_base
from qlora_inject.dora import DoraVariant
from qlora_inject.kernels.fused_lora import AdapterTerm, fused_lora_linear, lora_dtype_for
from qlora_inject.kernels.lora_batched import lora_gathered, stack_adapters
from qlora_inject.kernels.workspace import scratch
from qlora_inject.mixed_batch import assigned_adapters
from qlora_inject.registry import Backend, base_forward_is_exact, find_backend, trains_fused
from qlora_inject.variant import LoraVariant

BASE_ADAPTER = "__base__"                                                     # "no adapter" in a mixed batch


@dataclass(frozen=True)
class MergeResult:
    """How far a merged layer's output is from the unmerged adapted output, on a random probe."""

    adapters: tuple[str, ...]
    relative_error: float
    sqnr_db: float


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
    use_dora: bool = False
    loftq_config: dict | None = None

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclass
class BuiltAdapter:
    """One adapter built by `LoraLinear.build_adapter`, not yet attached."""

    modules: nn.ModuleDict                                                   # table name -> module
    variant: LoraVariant
    base: nn.Module | None = None                                            # PiSSA, OLoRA, LoftQ: the residual

    def train(self, mode: bool = True) -> None:
        self.modules.train(mode)
        if self.base is not None:
            self.base.train(mode)


class LoraLinear(nn.Module):
    """A base layer of any registered format with named LoRA adapters on top.

    Args:
        base_layer: The module to wrap; kept as is (the same object, its tensors untouched). Only a
            PiSSA/OLoRA/LoftQ start replaces it, at injection, by the requantized residual; a merge
            swaps in a requantized copy and unmerge puts this very object back.
        backend: The format backend that handles `base_layer`.

    Every per-adapter table is declared once, below, under PEFT's names. The rest of the package adds,
    deletes, freezes, saves and reads adapters through this class's methods (`update_layer`,
    `delete_adapter`, `adapters`, `adapter_parameters`, `set_requires_grad`, `adapter_state_keys`,
    `factors`, `variant`): nothing else deletes table entries or recognises parameters by their names.
    What an adapter adds to the output, to a merged weight and to a file, its variant says.
    """

    # nn.ModuleDicts holding each adapter's trained parameters: A (r, in), B (out, r), DoRA's magnitude.
    adapter_layer_names = ("lora_A", "lora_B", "lora_magnitude_vector")
    # The other per-adapter entries: the dropout modules (an nn.ModuleDict), then plain dicts of settings.
    # `lora_compute_dtype` holds the resolved dtype, `lora_compute_dtype_given` whether the config set it;
    # `lora_variant` the adapter's variant object (`variant.py`: plain LoRA, `dora.py`: DoRA).
    other_module_names = ("lora_dropout",)
    other_param_names = ("r", "lora_alpha", "scaling", "lora_compute_dtype", "lora_compute_dtype_given",
                         "lora_variant")

    def __init__(self, base_layer: nn.Module, backend: Backend) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.backend = backend
        self.in_features, self.out_features = backend.features(base_layer)
        adopt = getattr(backend, "adopt", None)                              # e.g. bnb 4-bit: opt out of CPU repacking
        if adopt is not None:
            adopt(base_layer)
        for table in (*self.adapter_layer_names, *self.other_module_names):
            setattr(self, table, nn.ModuleDict())
        for table in self.other_param_names:
            setattr(self, table, {})
        self.active_adapters: list[str] = []
        self.disable_adapters = False
        self.merged_adapters: list[str] = []
        # One adapter name per sample, set by hand on this module (not thread-safe). LoraModel's
        # `adapter_names=` does not use it: its assignment travels with the call (`sample_adapters`).
        self.batch_adapters: list[str] | None = None
        # Train through one fused op (base + adapters) where the backend allows it; False forces the
        # unfused path (the base's own forward, then each adapter's term), e.g. to compare the two.
        self.fuse = True
        # While merged, the original base module is kept here, unregistered (it is not part of the
        # state dict), and unmerge puts this very object back: its tensors never change.
        self.__dict__["unmerged_base"] = None

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

    def build_adapter(self, spec: AdapterSpec) -> BuiltAdapter:
        """Create (but do not attach) the modules of one adapter, on the base layer's device, and resolve its
        variant (plain LoRA, or DoRA for `spec.use_dora`).

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
        built = BuiltAdapter(nn.ModuleDict({"lora_A": lora_A, "lora_B": lora_B, "lora_dropout": dropout}),
                             DoraVariant() if spec.use_dora else LoraVariant())
        base = self.base_layer
        if init_schemes.is_scheme(spec.init_lora_weights):
            if device.type == "meta":
                raise ValueError(f"init_lora_weights={spec.init_lora_weights!r} needs the weights; "
                                 "load the model onto a device first")
            A, B, base = init_schemes.initialise(spec.init_lora_weights, self, spec.r, spec.scaling,
                                                 spec.loftq_config or {})
            with torch.no_grad():
                lora_A.weight.copy_(A)
                lora_B.weight.copy_(B)
            _freeze_like(base, self.base_layer)
            built.base = base                                                 # the residual, requantized
        built.modules.update(built.variant.init(self, spec, lora_A, lora_B, base))   # e.g. DoRA's magnitude
        return built

    def attach_adapter(self, adapter_name: str, spec: AdapterSpec, built: BuiltAdapter) -> None:
        """Register an adapter built by `build_adapter` under `adapter_name`."""
        tables = (*self.adapter_layer_names, *self.other_module_names)
        for table, module in built.modules.items():
            assert table in tables, f"{table!r} is not a declared adapter table {tables}"
            getattr(self, table)[adapter_name] = module
        if built.base is not None:                                           # PiSSA, OLoRA, LoftQ
            self.base_layer = built.base
            self.backend = find_backend(self.base_layer) or self.backend
        remember_base(self.base_layer)                                       # the objects injection freezes
        self.r[adapter_name] = spec.r
        self.lora_alpha[adapter_name] = spec.lora_alpha
        self.scaling[adapter_name] = spec.scaling
        self.lora_compute_dtype[adapter_name] = spec.compute_dtype or self.backend.compute_dtype(self.base_layer)
        self.lora_compute_dtype_given[adapter_name] = spec.compute_dtype is not None
        self.lora_variant[adapter_name] = built.variant

    def update_layer(self, adapter_name: str, spec: AdapterSpec) -> None:
        """Add one adapter (build and attach)."""
        if adapter_name in self.lora_A:
            raise ValueError(f"adapter {adapter_name!r} already exists on this layer")
        self.attach_adapter(adapter_name, spec, self.build_adapter(spec))

    @property
    def adapters(self) -> list[str]:
        """The names of the adapters on this layer, in the order they were added."""
        return list(self.lora_A)

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """The trainable tensors of one adapter on this layer (A, B, and DoRA's magnitude)."""
        return [param for table in self.adapter_layer_names if adapter_name in getattr(self, table)
                for param in getattr(self, table)[adapter_name].parameters()]

    def set_requires_grad(self, adapter_name: str, requires_grad: bool = True) -> None:
        """Freeze (`False`) or unfreeze one adapter's parameters, and no other's."""
        for param in self.adapter_parameters(adapter_name):
            param.requires_grad_(requires_grad)

    def adapter_state_keys(self, adapter_name: str) -> dict[str, str]:
        """PEFT's key → this layer's state-dict key, for each tensor adapter `adapter_name` saves (relative to
        this layer), e.g. `{"lora_A.weight": "lora_A.<name>.weight", ...}`; what its variant saves."""
        return self.lora_variant[adapter_name].saved_keys(adapter_name)

    def rank(self, adapter_name: str) -> int:
        """The rank r of one adapter."""
        return self.r[adapter_name]

    def variant(self, adapter_name: str) -> LoraVariant:
        """The variant object of one adapter (`variant.py`: plain LoRA; `dora.py`: DoRA), resolved when it was added."""
        return self.lora_variant[adapter_name]

    def factors(self, adapter_name: str) -> tuple[Tensor, Tensor, float]:
        """`(A, B, s)` of one adapter: its parameters A (r, in) and B (out, r), as stored, and its scale s."""
        return self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight, self.scaling[adapter_name]

    def load_factors(self, adapter_name: str, A: Tensor, B: Tensor) -> None:
        """Copy `A` (r, in) and `B` (out, r) into one adapter's parameters."""
        with torch.no_grad():
            self.lora_A[adapter_name].weight.copy_(A)
            self.lora_B[adapter_name].weight.copy_(B)

    def default_dtype(self) -> torch.dtype | None:
        """The dtype to probe or export this layer in: the first adapter's compute dtype, else the base's."""
        return next(iter(self.lora_compute_dtype.values()), None) or self.backend.compute_dtype(self.base_layer)

    def set_adapter(self, adapter_names: list[str]) -> None:
        """Make `adapter_names` the active adapters; only their parameters train."""
        self.active_adapters = list(adapter_names)
        for name in self.adapters:
            self.set_requires_grad(name, name in self.active_adapters)

    # --- forward --------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        if adapters_are_fsdp_units(self):                 # PEFT's wrap policy: gathered in their own forward
            return forward_through_adapter_units(self, x)
        fused = self._forward_fused(x)
        if fused is not None:
            return fused
        result = self.base_output(x)
        if self.disable_adapters:
            return result
        if self.sample_adapters() is not None:
            return self._add_lora_per_sample(result, x)
        for name in self.active_adapters:
            if name in self.lora_A and name not in self.merged_adapters:
                result = self._add_lora(result, x, name)
        return result

    def base_output(self, x: Tensor) -> Tensor:
        """The base layer's output alone: through the fused op (no adapters) where it applies, else
        the backend's forward (the owning library's own kernel)."""
        plan = self._fused_base(x, torch.is_grad_enabled() and x.requires_grad)
        if plan is None:
            return self.backend.forward(self.base_layer, x)
        dtype, dequantize, bias, own_forward = plan
        return fused_lora_linear(x, bias, dequantize, dtype, [], self.training, own_forward)

    def _fused_base(self, x: Tensor, needs_grad: bool):
        """How the fused op computes the base, `(dtype, dequantize, bias, own_forward)`, or None.

        Taken for backends marked `fused` while gradients are needed, and on CPU at inference too
        (where this library's dequantization kernels beat the libraries' CPU paths); not for a
        trainable base weight (as set on the parameters injection froze: FSDP's stand-ins do not
        count, see `distributed.base_trains`). Otherwise (GPU inference, where the owning library's
        kernels serve best) None, and the base runs its own forward.
        """
        if not (self.fuse and trains_fused(self.backend)) or (not needs_grad and x.device.type != "cpu"):
            return None
        base = self.base_layer
        if base_trains(base):
            return None
        # Under autocast, the base matmul (and the adapters') would run in the autocast dtype.
        autocast = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else self.backend.compute_dtype(base) or x.dtype
        numel, device = self.in_features * self.out_features, x.device

        def dequantize() -> Tensor:
            return self.backend.dequantize(base, out=scratch(numel, dtype, device))

        dequantize.format = self.backend.name                                 # its products' measured class
        own_forward = None
        if not base_forward_is_exact(self.backend, base, device):               # keep the format's own forward numerics
            def own_forward(inputs: Tensor) -> Tensor:
                return self.backend.forward(base, inputs)
        bias = getattr(base, "bias", None)
        return dtype, dequantize, bias if isinstance(bias, Tensor) else None, own_forward

    def _forward_fused(self, x: Tensor) -> Tensor | None:
        """The base and every active plain-LoRA adapter as one fused op, where `_fused_base` allows it;
        not for DoRA adapters, mixed batches, or adapters computing in a dtype other than the base's."""
        if self.disable_adapters or self.sample_adapters() is not None:
            return None
        names = [n for n in self.active_adapters if n in self.lora_A and n not in self.merged_adapters]
        if not names or not all(self.lora_variant[n].fusable for n in names):
            return None
        weights = [(self.lora_A[n].weight, self.lora_B[n].weight) for n in names]
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for pair in weights
                                                                          for t in pair))
        plan = self._fused_base(x, needs_grad)
        if plan is None:
            return None
        dtype, dequantize, bias, own_forward = plan
        lora_dtypes = {self.term_dtype(name, x) for name in names}
        if len(lora_dtypes) > 1:                                           # one op runs one LoRA dtype
            return None
        adapters = []
        for name, (A, B) in zip(names, weights, strict=True):
            dropout = self.lora_dropout[name]
            if not isinstance(dropout, (nn.Dropout, nn.Identity)):
                return None
            p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
            adapters.append((A, B, AdapterTerm(self.scaling[name], p)))
        return fused_lora_linear(x, bias, dequantize, dtype, adapters, self.training, own_forward, lora_dtypes.pop())

    def term_dtype(self, name: str, x: Tensor) -> torch.dtype:
        """The dtype adapter `name`'s term runs in for input `x`.

        A compute dtype set in the config is used as given. Otherwise (the base's compute dtype) the
        wider of it and `x`'s: an fp32 activation keeps an fp32 LoRA term beside a bf16 base matmul,
        as in PEFT. Under autocast, the autocast dtype.
        """
        dtype = self.lora_compute_dtype[name] or x.dtype
        if self.lora_compute_dtype_given.get(name) and not torch.is_autocast_enabled(x.device.type):
            return dtype
        return lora_dtype_for(dtype, x)

    def sample_adapters(self) -> list[str] | None:
        """One adapter name per sample for the running call (a mixed batch), or None: the assignment made
        by the current call's `LoraModel(..., adapter_names=...)` (per thread and task), else `batch_adapters`."""
        assigned = assigned_adapters(self)
        return assigned if assigned is not None else self.batch_adapters

    def _add_lora_per_sample(self, result: Tensor, x: Tensor) -> Tensor:
        """Mixed batch: sample i gets adapter `sample_adapters()[i]` (`"__base__"`: none)."""
        names = self.sample_adapters()
        if len(names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(names)} entries but the batch has {x.shape[0]} samples; "
                             "give one adapter name per sample")
        if self.merged_adapters:
            raise ValueError(f"cannot run a mixed batch while {self.merged_adapters} are merged; unmerge first")
        present = [n for n in dict.fromkeys(names) if n != BASE_ADAPTER and n in self.lora_A]
        dtypes = {self.term_dtype(n, x) for n in present}
        if len(present) > 1 and len(dtypes) == 1 and all(self.lora_variant[n].fusable for n in present):
            return self._add_lora_gathered(result, x, names, present, dtypes.pop())
        for name in dict.fromkeys(names):
            if name == BASE_ADAPTER or name not in self.lora_A:
                continue
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            result = result.index_copy(0, rows, self._add_lora(result[rows], x[rows], name))
        return result

    def _add_lora_gathered(self, result: Tensor, x: Tensor, names: list[str], present: list[str],
                           dtype: torch.dtype) -> Tensor:
        """Plain-LoRA mixed batch in one gathered shrink/expand over the stacked adapters."""
        A, B, scaling = self._stacked_adapters(present, dtype)
        position = {n: i for i, n in enumerate(present)}
        per_sample = torch.tensor([position.get(n, -1) for n in names], device=x.device)
        tokens_per_sample = x[0].numel() // self.in_features
        index = per_sample.repeat_interleave(tokens_per_sample)                     # (tokens,)
        if any(not isinstance(self.lora_dropout[n], nn.Identity) for n in present) and self.training:
            x = torch.cat([self.lora_dropout[n](x[i:i + 1]) if n in position else x[i:i + 1]
                           for i, n in enumerate(names)])
        flat = x.to(dtype).reshape(-1, self.in_features)
        delta = lora_gathered(flat, A, B, scaling, index)                          # (tokens, out)
        return result + delta.view(result.shape).to(result.dtype)

    def _stacked_adapters(self, present: list[str], dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """The adapters stacked for the gathered kernels, rebuilt only when an adapter's weights change.

        Serving calls this on every layer for every batch; the key holds each weight's storage and
        in-place version counter, so training steps, `load_state_dict` and re-initialisation all
        invalidate it.
        """
        weights = [(self.lora_A[n].weight, self.lora_B[n].weight) for n in present]
        key = (tuple(present), dtype, tuple((t.data_ptr(), t._version) for pair in weights for t in pair),
               tuple(self.scaling[n] for n in present))
        cached = self.__dict__.get("_stack_cache")
        if cached is not None and cached[0] == key and not torch.is_grad_enabled():
            return cached[1]
        A, B = stack_adapters([(a.to(dtype), b.to(dtype)) for a, b in weights])
        scaling = torch.tensor([self.scaling[n] for n in present], device=A.device, dtype=dtype)
        if not torch.is_grad_enabled():                                    # never cache tensors that carry a graph
            self.__dict__["_stack_cache"] = (key, (A, B, scaling))
        return A, B, scaling

    def _add_lora(self, result: Tensor, x: Tensor, name: str) -> Tensor:
        """`result` plus adapter `name`'s term, as its variant computes it."""
        return self.lora_variant[name].forward(self, name, result, x, self.term_dtype(name, x))

    # --- merge ----------------------------------------------------------------------------------

    def delta_weight(self, name: str) -> Tensor:
        """The adapter's dense update `s · B A`, (out, in), fp32."""
        return self.scaling[name] * (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float())

    def merge(self, adapter_names: list[str] | None = None, probe_tokens: int = 16) -> MergeResult | None:
        """Fold adapters into the base: requantize(dequantize(base) + Σ s·B A), in the base's own format.

        The original base module is kept and `unmerge` restores it exactly. Returns the merged
        layer's error against the unmerged adapted output on a random probe (None if nothing to merge).
        """
        requested = adapter_names or self.active_adapters
        names = [n for n in requested if n in self.lora_A and n not in self.merged_adapters]
        if not names:
            return None
        probe = self._probe(probe_tokens)
        with torch.no_grad(), self._probing([*self.active_adapters, *names]):
            reference = self(probe).float()
            weight = self._merged_weight(self.base_layer, names)
            merged = self.backend.requantize(self.base_layer, weight)
            _freeze_like(merged, self.base_layer)
            if self.unmerged_base is None:
                self.__dict__["unmerged_base"] = self.base_layer
            self.base_layer = merged
            self.merged_adapters.extend(names)
            output = self(probe).float()
        error = (output - reference).norm()
        signal = reference.norm().clamp_min(1e-12)
        sqnr = 20 * torch.log10(signal / error.clamp_min(1e-12))
        return MergeResult(tuple(names), (error / signal).item(), sqnr.item())

    @contextmanager
    def _probing(self, adapter_names: list[str]) -> Iterator[None]:
        """For the merge probe: `adapter_names` active and enabled, dropout off (the adapter's expected output,
        as in eval mode); the base module's own mode is left alone. Everything is restored on exit."""
        modules = [self, *self.lora_dropout.modules()]
        modes = [m.training for m in modules]
        saved = self.active_adapters, self.disable_adapters
        self.active_adapters, self.disable_adapters = list(dict.fromkeys(adapter_names)), False
        for module in modules:
            module.training = False
        try:
            yield
        finally:
            self.active_adapters, self.disable_adapters = saved
            for module, mode in zip(modules, modes, strict=True):
                module.training = mode

    def unmerge(self) -> None:
        """Put the original base module back (bit-identical: it is the same object)."""
        if self.unmerged_base is not None:
            self.base_layer = self.unmerged_base
            self.__dict__["unmerged_base"] = None
        self.merged_adapters = []

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove one adapter from this layer. A merged one is unmerged first: the original base comes back,
        and adapters that stay merged are merged again into it, so no trace of the deleted one is kept."""
        remerge = None
        if adapter_name in self.merged_adapters:
            remerge = [n for n in self.merged_adapters if n != adapter_name]
            self.unmerge()
        for table in (*self.adapter_layer_names, *self.other_module_names, *self.other_param_names):
            entries = getattr(self, table)
            if adapter_name in entries:
                del entries[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]
        if remerge:
            self.merge(remerge)

    def merged_dense(self, adapter_names: list[str], dtype: torch.dtype) -> nn.Linear:
        """A plain `nn.Linear` holding dequantize(base) + Σ s·B A for `adapter_names`, in `dtype`."""
        from qlora_inject.quantize import linear_from

        base = self.unmerged_base or self.base_layer
        with torch.no_grad():
            weight = self._merged_weight(base, [n for n in adapter_names if n in self.lora_A])
        return linear_from(weight, getattr(base, "bias", None), dtype, weight.device).requires_grad_(False)

    def _merged_weight(self, base: nn.Module, names: list[str]) -> Tensor:
        """dequantize(base) with the adapters `names` folded in (DoRA ones rescaled per row), fp32."""
        # A copy: for a dense base, dequantize() is the weight itself.
        weight = self.backend.dequantize(base).to(torch.float32, copy=True)
        for name in names:
            weight = self.lora_variant[name].merged_weight(self, name, weight)
        return weight

    def _probe(self, tokens: int) -> Tensor:
        dtype = self.default_dtype()
        probe = torch.randn(tokens, self.in_features, generator=torch.Generator().manual_seed(0))
        return probe.to(self.device, dtype or torch.float32)

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.r[n]} alpha={self.lora_alpha[n]}" for n in self.lora_A)
        return f"backend={self.backend.name}, in_features={self.in_features}, out_features={self.out_features}, {ranks}"


def _freeze_like(new: nn.Module, old: nn.Module) -> None:
    """Give `new`'s parameters the trainability of `old`'s namesakes (frozen when `old` has none)."""
    flags = {name: p.requires_grad for name, p in old.named_parameters()}
    for name, param in new.named_parameters():
        param.requires_grad_(flags.get(name, False) and param.is_floating_point())
