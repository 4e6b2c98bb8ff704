"""Adapter files in PEFT's format: `adapter_model.safetensors` + `adapter_config.json`.

Keys are PEFT's: `base_model.model.<module path>.lora_A.weight`, the adapter name removed; which
tensors an adapter saves, and under which key, each layer says (`LoraLinear.adapter_state_keys`, from
the adapter's variant; `ModulesToSaveWrapper.adapter_state_keys`), so no key is matched here by its
text. A save
writes the whole adapter into a staging folder and swaps it in (`atomic_files.replace_folder`): the
folder is the previous adapter or the new one, never a mix; other files in it are kept. Loads read
only adapter tensors (never a pickle), and check every key and shape before anything is attached.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from qlora_inject.atomic_files import atomic_write_bytes, recover_folder, replace_folder, write_file
from qlora_inject.config import CONFIG_NAME, LoraConfig
from qlora_inject.lora import LoraLinear
from qlora_inject.modules_to_save import ModulesToSaveWrapper

WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# Module-path segments of wrappers that state-dict keys leave out (FSDP1, activation checkpointing).
_UNNAMED_WRAPPERS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def _wrappers(model: nn.Module):
    """`(state-dict prefix, module)` for each module holding adapters (LoRA layers, modules to save)."""
    for path, module in model.named_modules():
        if isinstance(module, (LoraLinear, ModulesToSaveWrapper)):
            parts = [part for part in path.split(".") if part and part not in _UNNAMED_WRAPPERS]
            yield "".join(f"{part}." for part in parts), module


def adapter_keys(model: nn.Module, adapter_name: str) -> dict[str, str]:
    """PEFT's key → `model`'s state-dict key, for every tensor adapter `adapter_name` saves, e.g.
    `base_model.model.x.lora_A.weight` → `x.lora_A.<adapter>.weight`, `base_model.model.lm_head.weight` →
    `lm_head.modules_to_save.<adapter>.weight`, `base_model.model.x.lora_magnitude_vector` →
    `x.lora_magnitude_vector.<adapter>.weight`."""
    return {PREFIX + prefix + peft_key: prefix + own_key
            for prefix, module in _wrappers(model) if adapter_name in module.adapters
            for peft_key, own_key in module.adapter_state_keys(adapter_name).items()}


def adapter_state_dict(model: nn.Module, adapter_name: str, bias: str = "none") -> dict[str, Tensor]:
    """One adapter's tensors under PEFT's keys (adapter name removed, `base_model.model.` prefix)."""
    state = model.state_dict()
    names = {own: peft for peft, own in adapter_keys(model, adapter_name).items()}
    names.update({key: PREFIX + key for key in _saved_biases(model, state, bias)})
    lost = sorted(names.keys() - state.keys())
    assert not lost, f"adapter keys {lost[:3]} are not in the model's state dict"
    return {names[key]: tensor for key, tensor in state.items() if key in names}


def adapter_files(model: nn.Module, config: LoraConfig, adapter_name: str = "default",
                  tensors: dict[str, Tensor] | None = None) -> dict[str, bytes]:
    """One adapter as the bytes of its two files, `{WEIGHTS_NAME: ..., CONFIG_NAME: ...}`.

    `tensors`: the adapter's tensors under PEFT's keys where the caller gathered them already (FSDP);
    by default `adapter_state_dict(model, ...)`.

    Raises:
        ValueError: If `model` holds no adapter `adapter_name`.
    """
    from safetensors.torch import save

    if tensors is None:
        tensors = adapter_state_dict(model, adapter_name, config.bias)
    if not any(isinstance(m, LoraLinear) and adapter_name in m.adapters for m in model.modules()):
        raise ValueError(f"adapter {adapter_name!r} is not in this model; nothing to save")
    weights = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
    text = json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"     # as LoraConfig.save_pretrained
    return {WEIGHTS_NAME: weights, CONFIG_NAME: text.encode()}


def write_files(directory: Path, files: dict[str, bytes]) -> None:
    """Create each file in `directory` (a fresh folder, e.g. `replace_folder`'s staging one), fsynced."""
    for name, data in files.items():
        write_file(directory / name, data)


def save_adapter(model: nn.Module, directory: str | os.PathLike, config: LoraConfig,
                 adapter_name: str = "default", tensors: dict[str, Tensor] | None = None) -> Path:
    """Write one adapter in PEFT's format into `directory`, as one unit; return the directory.

    The folder is swapped whole (see `atomic_files.replace_folder`): a save killed at any moment
    leaves the previous adapter or the new one. Other files in `directory` are kept.
    `model` is the model that holds the LoRA layers (not a `LoraModel` facade: pass `.model`).
    """
    files = adapter_files(model, config, adapter_name, tensors)
    return replace_folder(directory, lambda staging: write_files(staging, files), owned=files)


def read_adapter(directory: str | os.PathLike) -> tuple[LoraConfig, dict[str, Tensor]]:
    """Read an adapter directory (ours or PEFT's) without touching any model.

    A folder left missing by a save killed mid-swap is put back first (`recover_folder`).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        recover_folder(directory)
    except OSError:                                                          # read-only: read what is there
        pass
    config = LoraConfig.from_pretrained(directory)
    if config.init_lora_weights not in (True, False, "gaussian"):
        # A data-aware start (PiSSA, OLoRA, LoftQ) rewrites the base when it runs; loading must not.
        config = dataclasses.replace(config, init_lora_weights=True)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {str(directory)!r}; (.bin adapters are not read, convert them)")
    try:
        tensors = load_file(weights)
    except SafetensorError as err:
        raise ValueError(f"{weights} is not a readable safetensors file ({err}); re-save the adapter") from None
    return config, tensors


def check_and_copy(model: nn.Module, tensors: dict[str, Tensor], adapter_name: str, bias: str = "none") -> None:
    """Copy PEFT-keyed `tensors` into `model`'s adapter `adapter_name`, all or nothing.

    Only the adapter's own tensors load: `lora_A`/`lora_B`/`lora_magnitude_vector`, its
    `modules_to_save` copies, and the biases its config's `bias` trains. A key naming anything else
    (a base weight such as `embed_tokens.weight`, a packed `k_proj.weight`) is unexpected: the frozen
    base is never written from an adapter file.

    Raises:
        ValueError: Naming every missing, unexpected, mis-shaped and integer-typed key; nothing is
            copied then.
    """
    foreign = [k for k in tensors if not k.startswith(PREFIX)]
    if foreign:
        raise ValueError(f"adapter key {foreign[0]!r} does not start with {PREFIX!r}; "
                         "is this a PEFT LoRA adapter file?")
    state = model.state_dict()
    expected = adapter_keys(model, adapter_name)                             # file key -> model key
    allowed = {**expected, **{PREFIX + key: key for key in _saved_biases(model, state, bias)}}
    missing = sorted(k for k in expected if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in allowed)
    mapped = {allowed[k]: v for k, v in tensors.items() if k in allowed}
    misshaped = sorted(f"{k}: file {tuple(v.shape)}, model {tuple(state[allowed[k]].shape)}"
                       for k, v in tensors.items() if k in allowed and state[allowed[k]].shape != v.shape)
    mistyped = sorted(f"{k}: file {v.dtype}, model {state[allowed[k]].dtype}" for k, v in tensors.items()
                      if k in allowed and state[allowed[k]].is_floating_point() and not v.is_floating_point())
    if missing or unexpected or misshaped or mistyped:
        def shown(keys: list[str]) -> list[str]:                            # as the file names them
            return [k.removeprefix(PREFIX) for k in keys[:5]]

        parts = [f"{label} ({len(keys)}): {shown(keys)}{' …' if len(keys) > 5 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped),
                                     ("not floating-point", mistyped))
                 if keys]
        raise ValueError(
            f"adapter weights do not fit the model: {'; '.join(parts)}. "
            "Load it onto the base model it was trained on, with its own adapter_config.json"
        )
    with torch.no_grad():
        for key, value in mapped.items():
            state[key].copy_(value)


def _saved_biases(model: nn.Module, state: dict[str, Tensor], bias: str) -> set[str]:
    """The state-dict keys of the biases an adapter with this `bias` setting trains and saves: none; every
    bias of the model that no adapter owns (`"all"`); or the LoRA layers' base biases (`"lora_only"`)."""
    if bias == "lora_only":
        keys = {f"{prefix}base_layer.bias" for prefix, module in _wrappers(model)
                if isinstance(module, LoraLinear) and getattr(module.base_layer, "bias", None) is not None}
        return keys & state.keys()
    if bias == "all":
        owned = {prefix + own for prefix, module in _wrappers(model) for name in module.adapters
                 for own in module.adapter_state_keys(name).values()}
        return {key for key in state if key.endswith(".bias") and key not in owned}
    return set()


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "adapter_files", "adapter_keys", "adapter_state_dict", "atomic_write_bytes",
           "check_and_copy", "read_adapter", "replace_folder", "save_adapter", "write_files"]
