"""Adapter files in PEFT's format: `adapter_model.safetensors` + `adapter_config.json`.

Keys are PEFT's: `base_model.model.<module path>.lora_A.weight`, the adapter name removed. A save
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

WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_ADAPTER_SEGMENTS = ("lora_A", "lora_B", "lora_magnitude_vector", "modules_to_save")
_MAGNITUDE = "lora_magnitude_vector"                                          # PEFT saves it without ".weight"
_SAVED_COPY = "modules_to_save"                                               # PEFT drops this level in files


def adapter_state_dict(model: nn.Module, adapter_name: str, bias: str = "none") -> dict[str, Tensor]:
    """One adapter's tensors under PEFT's keys (adapter name removed, `base_model.model.` prefix)."""
    out: dict[str, Tensor] = {}
    tag = f".{adapter_name}."
    for key, tensor in model.state_dict().items():
        segment = next((s for s in _ADAPTER_SEGMENTS if f".{s}{tag}" in f".{key}"), None)
        if segment == _SAVED_COPY:                                           # lm_head.modules_to_save.a.weight
            out[PREFIX + key.replace(f"{segment}{tag}", "")] = tensor        # → lm_head.weight
        elif segment == _MAGNITUDE:                                          # x.lora_magnitude_vector.a.weight
            out[PREFIX + key.replace(f"{segment}{tag}weight", segment)] = tensor   # → x.lora_magnitude_vector
        elif segment is not None:
            out[PREFIX + key.replace(f"{segment}{tag}", f"{segment}.")] = tensor
        elif _is_saved_bias(key, bias):
            out[PREFIX + key] = tensor
    return out


def peft_key_to_model_key(key: str, adapter_name: str, model_keys) -> str:
    """`base_model.model.x.lora_A.weight` → `x.lora_A.<adapter>.weight`;
    `base_model.model.lm_head.weight` → `lm_head.modules_to_save.<adapter>.weight` when lm_head is saved whole."""
    if not key.startswith(PREFIX):
        raise ValueError(f"adapter key {key!r} does not start with {PREFIX!r}; is this a PEFT LoRA adapter file?")
    key = key[len(PREFIX):]
    if key.endswith(f".{_MAGNITUDE}"):
        return f"{key}.{adapter_name}.weight"
    for segment in _ADAPTER_SEGMENTS:
        marker = f".{segment}."
        if marker in f".{key}":
            head, _, tail = f".{key}".partition(marker)
            return f"{head}{marker}{adapter_name}.{tail}".removeprefix(".")
    module, _, leaf = key.rpartition(".")
    saved_copy = f"{module}.{_SAVED_COPY}.{adapter_name}.{leaf}".removeprefix(".")
    return saved_copy if saved_copy in model_keys else key


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
    if not any(".lora_A." in k for k in tensors):
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
    state = model.state_dict()
    mapped = {peft_key_to_model_key(k, adapter_name, state.keys()): v for k, v in tensors.items()}
    expected = {k for k in state if any(f".{s}.{adapter_name}." in f".{k}" for s in _ADAPTER_SEGMENTS)}
    allowed = expected | {k for k in state if _is_saved_bias(k, bias)}
    missing = sorted(expected - mapped.keys())
    unexpected = sorted(k for k in mapped if k not in allowed)
    misshaped = sorted(f"{k}: file {tuple(v.shape)}, model {tuple(state[k].shape)}"
                       for k, v in mapped.items() if k in state and state[k].shape != v.shape)
    mistyped = sorted(f"{k}: file {v.dtype}, model {state[k].dtype}" for k, v in mapped.items()
                      if k in allowed and state[k].is_floating_point() and not v.is_floating_point())
    if missing or unexpected or misshaped or mistyped:
        def shown(keys: list[str]) -> list[str]:                            # as the file names them
            return [k.replace(f".{adapter_name}.", ".") for k in keys[:5]]

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


def _is_saved_bias(key: str, bias: str) -> bool:
    if bias == "all":
        return key.endswith(".bias") and ".lora_" not in key
    if bias == "lora_only":
        return key.endswith(".base_layer.bias")
    return False


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "adapter_files", "adapter_state_dict", "atomic_write_bytes",
           "check_and_copy", "read_adapter", "replace_folder", "save_adapter", "write_files"]
