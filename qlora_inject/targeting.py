"""Which modules a config targets, and why the others are not.

Rules, as PEFT's:
- a list matches a module whose name equals an entry or ends with `.` + entry;
- a string is a regex that must match the whole module name;
- `"all-linear"` matches every linear-like layer some backend handles, quantized or not, except the
  model's output head;
- `exclude_modules` (list or regex, same rules) wins over the targets;
- `layers_to_transform` keeps only modules under `<layers_pattern>.<index>.` with a listed index.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator

from torch import nn

from qlora_inject.config import LoraConfig
from qlora_inject.lora import LoraLinear
from qlora_inject.modules_to_save import ModulesToSaveWrapper
from qlora_inject.registry import find_backend

# Defaults when target_modules is None, by `model.config.model_type` (PEFT's choices).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
}


class TargetNotFoundError(ValueError):
    """A `target_modules` entry (or regex) that matches no module of the model."""


def iter_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """`named_modules`, without descending into LoRA or modules-to-save wrappers."""
    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            yield full, child
            if not isinstance(child, (LoraLinear, ModulesToSaveWrapper)):
                yield from walk(child, full)
    yield from walk(model, "")


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted path `name` inside `model`."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def resolve_targets(model: nn.Module, config: LoraConfig) -> list[str] | str:
    """`config.target_modules`, or the default for the model type when it is None."""
    if config.target_modules is not None:
        return config.target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    raise ValueError(
        f"target_modules is None and model type {model_type!r} has no default; "
        "pass target_modules=[...] (module name suffixes such as 'q_proj') or 'all-linear'"
    )


def name_matches(name: str, spec: list[str] | str) -> bool:
    """True when `name` is selected by a list of suffixes or a full-match regex."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in spec)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head (skipped by `"all-linear"`, as in PEFT)."""
    head = None
    get_head = getattr(model, "get_output_embeddings", None)
    if callable(get_head):
        try:
            head = get_head()
        except (NotImplementedError, AttributeError):
            head = None
    names = {name for name, module in iter_modules(model) if head is not None and module is head}
    return names or {name for name, _ in iter_modules(model) if name.split(".")[-1] == "lm_head"}


def layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    """The layer number in a module name (`model.layers.3.mlp` → 3), or None."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    regexes = [r".*\.[^.]*\.(\d+)\."] if not patterns else [rf".*\.{re.escape(p)}\.(\d+)\." for p in patterns]
    for regex in regexes:
        found = re.match(regex, name + ".") or re.match(regex.removeprefix(".*\\."), name + ".")
        if found:
            return int(found.group(1))
    return None


def why_not_targeted(name: str, module: nn.Module, config: LoraConfig, targets: list[str] | str,
                     head_names: set[str]) -> str | None:
    """None when the module is targeted; otherwise the reason it is not."""
    if targets == "all-linear":
        if not isinstance(module, LoraLinear) and find_backend(module) is None:
            return "not a linear-like layer"
        if name in head_names:
            return "output head (all-linear skips it)"
    elif not name_matches(name, targets):
        return "not in target_modules"
    if config.exclude_modules is not None and name_matches(name, config.exclude_modules):
        return "in exclude_modules"
    if config.layers_to_transform is not None:
        index = layer_index(name, config.layers_pattern)
        if index is None:
            return f"no layer index under layers_pattern={config.layers_pattern!r}"
        if index not in config.layers_to_transform:
            return f"layer {index} not in layers_to_transform"
    return None


def select_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """The `(name, module)` pairs the config targets, in model order.

    Raises:
        TargetNotFoundError: When a listed target (or the regex) matches no module at all,
            with the closest module names as suggestions.
    """
    targets = resolve_targets(model, config)
    modules = list(iter_modules(model))
    _check_every_target_exists(targets, [name for name, _ in modules])
    heads = output_head_names(model) if targets == "all-linear" else set()
    return [(name, module) for name, module in modules
            if why_not_targeted(name, module, config, targets, heads) is None]


def _check_every_target_exists(targets: list[str] | str, names: list[str]) -> None:
    if targets == "all-linear":
        return
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, n) for n in names):
            example = names[-1] if names else "<none>"
            raise TargetNotFoundError(
                f"target_modules regex {targets!r} matches no module name; it must match a whole name "
                f"such as {example!r}: fix the regex, or pass a list of name suffixes"
            )
        return
    leaves = sorted({n.split(".")[-1] for n in names})
    for entry in targets:
        if not any(n == entry or n.endswith("." + entry) for n in names):
            close = difflib.get_close_matches(entry.split(".")[-1], leaves, n=3, cutoff=0.5)
            hint = f"did you mean {close}?" if close else f"module names end with e.g. {leaves[:8]}"
            raise TargetNotFoundError(
                f"target_modules entry {entry!r} matches no module of the model; {hint} "
                "Fix the name in target_modules, or use 'all-linear'"
            )
