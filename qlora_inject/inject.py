"""Injection: select targets, dispatch each to its backend, wrap, swap in, freeze, report.

All-or-nothing: every check runs and every adapter is built before the first module is swapped,
so a bad target, shape or dtype leaves the model exactly as it was.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from qlora_inject.backends.dense import is_conv1d
from qlora_inject.config import LoraConfig
from qlora_inject.lora import BASE_ADAPTER, AdapterSpec, LoraLinear
from qlora_inject.modules_to_save import ModulesToSaveWrapper, check_trainable_in_full
from qlora_inject.registry import check_wrappable, require_backend
from qlora_inject.selfcheck import layer_key, verify_layout
from qlora_inject.targeting import iter_modules, name_matches, replace_module, select_targets

RESERVED_ADAPTER_NAMES = (BASE_ADAPTER,)                                   # means "no adapter" in a mixed batch


@dataclass(frozen=True)
class WrappedModule:
    """One layer that received an adapter."""

    name: str
    backend: str
    base_class: str
    in_features: int
    out_features: int
    r: int
    lora_alpha: float
    scaling: float
    compute_dtype: torch.dtype | None


@dataclass
class InjectionReport:
    """What `inject` did: each wrapped layer, and the modules trained in full."""

    adapter_name: str
    wrapped: list[WrappedModule] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.wrapped)

    def backends(self) -> dict[str, int]:
        """How many layers each backend wrapped."""
        counts: dict[str, int] = {}
        for item in self.wrapped:
            counts[item.backend] = counts.get(item.backend, 0) + 1
        return counts

    def __str__(self) -> str:
        lines = [f"adapter {self.adapter_name!r}: {len(self.wrapped)} layers wrapped {self.backends()}",
                 "| module | backend | base class | in | out | r | alpha | compute dtype |",
                 "|---|---|---|---|---|---|---|---|"]
        for w in self.wrapped:
            dtype = str(w.compute_dtype).removeprefix("torch.") if w.compute_dtype else "input"
            lines.append(f"| {w.name} | {w.backend} | {w.base_class} | {w.in_features} | {w.out_features} "
                         f"| {w.r} | {w.lora_alpha:g} | {dtype} |")
        if self.modules_to_save:
            lines.append(f"trained in full: {self.modules_to_save}")
        return "\n".join(lines)


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter present anywhere in the model, in the order first seen."""
    names: dict[str, None] = {}
    for module in model.modules():
        if isinstance(module, (LoraLinear, ModulesToSaveWrapper)):
            names.update(dict.fromkeys(module.adapters))
    return list(names)


def inject(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> InjectionReport:
    """Wrap the layers `config` targets with a new adapter called `adapter_name`, in place.

    The first adapter injected into a model becomes the active one; later ones are added inactive
    (activate them with `set_adapter`). Only adapter parameters (and biases, per `config.bias`, and
    `modules_to_save`) are left trainable.

    Returns:
        An `InjectionReport` of every wrapped layer.

    Raises:
        ValueError: A bad adapter name, a target that matches nothing, a bad regex.
        UnsupportedModuleError: A targeted layer no backend handles.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a qlora_inject.LoraConfig, got {type(config).__name__}")
    config.validate()
    if getattr(type(model), "__module__", "") == "qlora_inject.model":          # a LoraModel: keep its records
        raise ValueError(f"model is a LoraModel; add the adapter with model.add_adapter({adapter_name!r}, config), "
                         "which records its config (inject on it would leave the LoraModel out of sync)")
    existing = adapter_names(model)
    _check_adapter_name(adapter_name, existing)

    # 1. Plan: decide everything and build every new module, touching nothing.
    plan = []
    checked: set[tuple] = set()
    for name, module in select_targets(model, config):
        if isinstance(module, LoraLinear):
            wrapper = module
        else:
            backend = require_backend(module, name)
            check_wrappable(backend, module)
            key = layer_key(backend, module)
            if key not in checked:                                       # once per layer configuration
                verify_layout(backend, module, name)
                checked.add(key)
            wrapper = LoraLinear(module, backend)
        spec = AdapterSpec(
            r=config.rank_for(name), lora_alpha=config.alpha_for(name), lora_dropout=config.lora_dropout,
            init_lora_weights=config.init_lora_weights, use_rslora=config.use_rslora,
            adapter_dtype=config.adapter_dtype, compute_dtype=config.compute_dtype, use_dora=config.use_dora,
            loftq_config=config.loftq_config,
        )
        plan.append((name, module, wrapper, spec, wrapper.build_adapter(spec)))
    _warn_on_fan_in_fan_out(config, [(name, module) for name, module, *_ in plan])
    saved = _plan_modules_to_save(model, config)
    if not plan:
        raise ValueError(
            f"config selects no layer (target_modules={config.target_modules!r}, "
            f"exclude_modules={config.exclude_modules!r}, layers_to_transform={config.layers_to_transform!r}); "
            "widen target_modules or loosen the filters"
        )

    # 2. Commit: nothing below can fail on valid input.
    active = _current_active(model) or [adapter_name]
    report = InjectionReport(adapter_name)
    for name, module, wrapper, spec, built in plan:
        built.train(module.training)                                         # a model in eval mode stays there
        wrapper.attach_adapter(adapter_name, spec, built)
        wrapper.training = module.training
        if wrapper is not module:
            replace_module(model, name, wrapper)
        report.wrapped.append(WrappedModule(
            name=name, backend=wrapper.backend.name, base_class=type(wrapper.base_layer).__name__,
            in_features=wrapper.in_features, out_features=wrapper.out_features, r=spec.r,
            lora_alpha=spec.lora_alpha, scaling=spec.scaling, compute_dtype=wrapper.lora_compute_dtype[adapter_name],
        ))
    for name, module, wrapper, copy in saved:
        wrapper.add_copy(adapter_name, copy)
        if wrapper is not module:
            replace_module(model, name, wrapper)
        report.modules_to_save.append(name)

    mark_only_adapters_trainable(model, config.bias)
    set_active_adapters(model, active)
    return report


def set_active_adapters(model: nn.Module, names: list[str]) -> None:
    """Activate `names` on every wrapper; only active adapters' parameters train."""
    for module in model.modules():
        if isinstance(module, (LoraLinear, ModulesToSaveWrapper)):
            module.set_adapter(names)


def mark_only_adapters_trainable(model: nn.Module, bias: str) -> None:
    """Freeze everything except adapters, modules to save, and biases per `bias`."""
    adapters = {id(param) for module in model.modules() if isinstance(module, (LoraLinear, ModulesToSaveWrapper))
                for name in module.adapters for param in module.adapter_parameters(name)}
    for param in model.parameters():
        if id(param) not in adapters and param.requires_grad:
            param.requires_grad_(False)
    if bias == "none":
        return
    for module in model.modules():
        if bias == "all" or isinstance(module, LoraLinear):
            target = module.base_layer if isinstance(module, LoraLinear) else module
            if getattr(target, "bias", None) is not None and target.bias.is_floating_point():
                target.bias.requires_grad_(True)


def _current_active(model: nn.Module) -> list[str]:
    for module in model.modules():
        if isinstance(module, LoraLinear):
            return list(module.active_adapters)
    return []


def _check_adapter_name(adapter_name: str, existing: list[str]) -> None:
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name={adapter_name!r} must be a non-empty string without '.', e.g. 'default'")
    if hasattr(nn.ModuleDict(), adapter_name):
        raise ValueError(f"adapter_name={adapter_name!r} clashes with an attribute of torch modules "
                         "(adapters live in nn.ModuleDicts); pick another name, e.g. 'default'")
    if adapter_name in RESERVED_ADAPTER_NAMES:
        raise ValueError(f"adapter_name={adapter_name!r} is reserved (it means 'no adapter'); pick another name")
    if adapter_name in existing:
        raise ValueError(
            f"adapter {adapter_name!r} already exists in this model (adapters: {existing}); "
            "pick another name, or delete the existing adapter first"
        )


def _warn_on_fan_in_fan_out(config: LoraConfig, targets: list[tuple[str, nn.Module]]) -> None:
    """`fan_in_fan_out` is a fact of each layer (Conv1D stores (in, out)); the layer wins, with a warning."""
    wrong = [name for name, module in targets
             if is_conv1d(module.base_layer if isinstance(module, LoraLinear) else module) != config.fan_in_fan_out]
    if wrong:
        actual = "(out, in)" if config.fan_in_fan_out else "(in, out) (transformers Conv1D)"
        warnings.warn(
            f"fan_in_fan_out={config.fan_in_fan_out} but {len(wrong)} targeted layer(s), e.g. {wrong[0]!r}, store "
            f"their weight as {actual}; each layer's own layout is used. Set fan_in_fan_out="
            f"{not config.fan_in_fan_out} to silence this",
            UserWarning, stacklevel=3,
        )


def _plan_modules_to_save(model: nn.Module, config: LoraConfig):
    if not config.modules_to_save:
        return []
    plan = []
    for name, module in iter_modules(model):
        if isinstance(module, LoraLinear) or not name_matches(name, config.modules_to_save):
            continue
        if not isinstance(module, ModulesToSaveWrapper):
            check_trainable_in_full(module, name, config.modules_to_save)
        wrapper = module if isinstance(module, ModulesToSaveWrapper) else ModulesToSaveWrapper(module)
        plan.append((name, module, wrapper, wrapper.build_copy()))
    if not plan:
        raise ValueError(
            f"modules_to_save={config.modules_to_save!r} matches no module; use name suffixes such as 'lm_head'"
        )
    return plan


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove one adapter everywhere; a wrapper left with no adapter is replaced by its base module."""
    if adapter_name not in adapter_names(model):
        raise ValueError(f"adapter {adapter_name!r} is not in this model (adapters: {adapter_names(model)})")
    for name, module in list(iter_modules(model)):
        if isinstance(module, (LoraLinear, ModulesToSaveWrapper)) and adapter_name in module.adapters:
            module.delete_adapter(adapter_name)                   # a merged adapter is unmerged first
            if not module.adapters:
                original = module.base_layer if isinstance(module, LoraLinear) else module.original_module
                replace_module(model, name, original)
