"""`LoraConfig`: what to wrap and how, with PEFT's field names and meanings.

A config written here is read by PEFT (`adapter_config.json`), and a PEFT config loads here.
Fields PEFT has that this library does not implement yet are refused with a clear error rather
than silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qlora_inject.atomic_files import atomic_write_bytes
from qlora_inject.init_schemes import is_scheme

CONFIG_NAME = "adapter_config.json"

BIAS_CHOICES = ("none", "all", "lora_only")
INIT_CHOICES = (True, False, "gaussian", "pissa", "pissa_niter_N", "olora", "loftq")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Fields that exist only here; PEFT would not know them, so they stay out of adapter_config.json.
LOCAL_FIELDS = ("compute_dtype", "adapter_dtype")


def parse_dtype(value: str | torch.dtype | None, field_name: str) -> torch.dtype | None:
    """Turn `"bfloat16"` / `torch.bfloat16` / `None` into a torch dtype (or None)."""
    if value is None or isinstance(value, torch.dtype):
        if value is not None and value not in _DTYPES.values():
            raise ValueError(f"{field_name}={value} is not a float dtype; use one of {sorted(_DTYPES)}")
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in _DTYPES:
        return _DTYPES[value.removeprefix("torch.")]
    raise ValueError(f"{field_name}={value!r} is not a dtype; use one of {sorted(_DTYPES)} or None")


@dataclass
class LoraConfig:
    """LoRA settings, field for field as in PEFT's `LoraConfig`.

    Args:
        r: Rank of the update `ΔW = B A` (A is r × in, B is out × r).
        lora_alpha: Scale numerator: the update is multiplied by `lora_alpha / r`
            (or `lora_alpha / sqrt(r)` with `use_rslora`).
        lora_dropout: Dropout probability applied to the adapter's input.
        target_modules: Which modules to wrap: a list of names or name suffixes
            (`["q_proj", "v_proj"]`), a regex that must match the whole module name, or
            `"all-linear"` (every linear-like layer a backend recognises, quantized or not,
            except the output head). None uses the default for the model type.
        exclude_modules: Names (list, suffix match) or a regex of modules never to wrap.
        layers_to_transform: Only wrap modules in these layer indices.
        layers_pattern: Name of the layer list (`"layers"`, `"h"`, …) that the indices refer to.
        rank_pattern: `{name pattern: r}` overriding `r` for matching modules.
        alpha_pattern: `{name pattern: alpha}` overriding `lora_alpha` for matching modules.
        use_rslora: Use `lora_alpha / sqrt(r)` as the scale (rank-stabilised LoRA).
        bias: Which biases train: `"none"`, `"all"` (every bias in the model) or `"lora_only"`
            (the biases of wrapped layers).
        modules_to_save: Modules (name suffixes) trained in full and saved beside the adapter.
        init_lora_weights: `True` (A Kaiming-uniform, B zero: the adapter starts as a no-op),
            `"gaussian"` (A normal with std 1/r, B zero), `False` (both random: for tests), or a
            data-aware start on any format with a requantize: `"pissa"` / `"pissa_niter_N"`,
            `"olora"`, `"loftq"` (see `qlora_inject.init_schemes`).
        loftq_config: For `"loftq"`: `{"format": "nf4"|…, "loftq_iter": 1, "bits": 4, "group_size": 64}`.
        fan_in_fan_out: True when the layer stores its weight as (in, out), as GPT-2's `Conv1D`.
            The dense backend detects `Conv1D` itself; a wrong value is corrected with a warning.
        task_type: Informational, as in PEFT (`"CAUSAL_LM"`, …).
        use_dora: Weight-decomposed LoRA (DoRA): a trained magnitude per output row, on every format.
        compute_dtype: The dtype the adapter path computes in. None follows the base layer
            (bitsandbytes' `compute_dtype`, the dense weight's dtype, or the input's dtype).
        adapter_dtype: The dtype adapter parameters are stored in (default fp32, as PEFT's
            `autocast_adapter_dtype`); they are cast to `compute_dtype` in the forward.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    fan_in_fan_out: bool = False
    task_type: str | None = None
    use_dora: bool = False
    loftq_config: dict = field(default_factory=dict)
    base_model_name_or_path: str | None = None
    inference_mode: bool = False
    compute_dtype: str | torch.dtype | None = None
    adapter_dtype: str | torch.dtype | None = "float32"
    peft_type: str = "LORA"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field's type and value; raise `TypeError`/`ValueError` naming the field, the value,
        what is expected and the fix. Non-finite numbers (nan, inf) are refused."""
        _check_rank("r", self.r)
        self.rank_pattern = _check_patterns("rank_pattern", self.rank_pattern, _check_rank)
        _check_number("lora_alpha", self.lora_alpha, "lora_alpha=16")
        self.alpha_pattern = _check_patterns("alpha_pattern", self.alpha_pattern,
                                             lambda name, value: _check_number(name, value, "16"))
        _check_number("lora_dropout", self.lora_dropout, "lora_dropout=0.05")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout!r} must be in [0, 1), e.g. 0.05")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}={getattr(self, name)!r} must be True or False (a bool), e.g. {name}=True")
        for name in ("task_type", "base_model_name_or_path", "bias", "peft_type"):
            value = getattr(self, name)
            optional = name in ("task_type", "base_model_name_or_path")
            if not isinstance(value, str) and not (optional and value is None):
                raise TypeError(f"{name}={value!r} must be a string{' or None' if optional else ''}")
        if self.bias not in BIAS_CHOICES:
            raise ValueError(f"bias={self.bias!r} is not one of {BIAS_CHOICES}")
        if not isinstance(self.init_lora_weights, (bool, str)) or (
                self.init_lora_weights not in (True, False, "gaussian") and not is_scheme(self.init_lora_weights)):
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported; use one of {INIT_CHOICES}"
            )
        if self.loftq_config is None:
            self.loftq_config = {}
        if not isinstance(self.loftq_config, dict):
            raise TypeError(f"loftq_config={self.loftq_config!r} must be a dict, e.g. "
                            "{'format': 'nf4', 'loftq_iter': 1}, or {} when init_lora_weights is not 'loftq'")
        if self.peft_type != "LORA":
            raise ValueError(f"peft_type={self.peft_type!r}: only LoRA adapters ('LORA') are handled here")
        for name in ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern"):
            setattr(self, name, _check_names(name, getattr(self, name)))
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            _compile(self.target_modules, "target_modules")
        if isinstance(self.exclude_modules, str):
            _compile(self.exclude_modules, "exclude_modules")
        self.layers_to_transform = _check_layers(self.layers_to_transform)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                f"layers_to_transform={self.layers_to_transform!r} cannot be combined with the regex "
                f"target_modules={self.target_modules!r} (PEFT refuses it too); put the layer numbers in the "
                "regex, or pass target_modules as a list of names"
            )
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ValueError(
                f"layers_pattern={self.layers_pattern!r} is only used with layers_to_transform; "
                "set layers_to_transform=[...] too, or drop layers_pattern"
            )
        for pattern in list(self.rank_pattern) + list(self.alpha_pattern):
            _compile(pattern, "rank_pattern/alpha_pattern key")
        self.compute_dtype = parse_dtype(self.compute_dtype, "compute_dtype")
        self.adapter_dtype = parse_dtype(self.adapter_dtype, "adapter_dtype")

    def rank_for(self, module_name: str) -> int:
        """The rank for one module: `rank_pattern`'s first matching key, else `r`."""
        key = _pattern_key(self.rank_pattern, module_name)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        """The alpha for one module: `alpha_pattern`'s first matching key, else `lora_alpha`."""
        key = _pattern_key(self.alpha_pattern, module_name)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    # --- adapter_config.json --------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The fields PEFT reads, JSON-serialisable."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in LOCAL_FIELDS}
        return json.loads(json.dumps(data, default=sorted))

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write `adapter_config.json` into `directory` atomically; return its path."""
        path = Path(directory) / CONFIG_NAME
        atomic_write_bytes(path, (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode())
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """Build from a PEFT-style dict; keys this library does not know are refused if they
        would change the adapter's meaning, and ignored if they are bookkeeping."""
        if not isinstance(data, dict):
            raise ValueError(f"an adapter config must be a dict of LoraConfig fields like {{'r': 8}}, "
                             f"got {type(data).__name__} {_short(data)}")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        unknown = {k: v for k, v in data.items() if k not in known}
        meaningful = {k: v for k, v in unknown.items() if v not in (None, False, {}, [], "") and k not in _IGNORED}
        if meaningful:
            raise ValueError(
                f"adapter config sets {sorted(meaningful)}, which qlora_inject does not implement; "
                "remove them or load the adapter with PEFT"
            )
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> LoraConfig:
        """Read `adapter_config.json` from a directory (ours or PEFT's).

        Raises:
            FileNotFoundError: If the folder has no `adapter_config.json`.
            ValueError: If the file is empty, not UTF-8 text, not JSON, or not a JSON object; naming
                the file and what is wrong. Bad field values are named with the file too.
        """
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {str(directory)!r}; is this an adapter directory?")
        fix = "restore it, or save the adapter again"
        raw = path.read_bytes()
        if not raw.strip():
            raise ValueError(f"{path} is empty; it should hold the adapter's settings as JSON: {fix}")
        try:
            data = json.loads(raw.decode("utf-8-sig"))
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not text (byte {err.start} is not UTF-8; a binary file?): {fix}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}): "
                             f"{fix}") from None
        if not isinstance(data, dict):
            kind = _JSON_KINDS.get(type(data), type(data).__name__)
            raise ValueError(f"{path} holds a JSON {kind} ({_short(json.dumps(data))}), "
                             f"not an object of LoraConfig fields like {{\"r\": 8}}: {fix}")
        try:
            return cls.from_dict(data)
        except TypeError as err:
            raise TypeError(f"{path}: {err}") from None
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


_JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# PEFT bookkeeping keys that do not change what the adapter computes.
_IGNORED = {
    "auto_mapping", "peft_version", "revision", "megatron_core", "runtime_config", "qalora_group_size",
    "ensure_weight_tying",
}


def _check_rank(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer, e.g. r=16")


_BOOL_FIELDS = ("use_rslora", "fan_in_fan_out", "use_dora", "inference_mode")


def _check_number(name: str, value: object, example: str) -> None:
    """A real, finite number (not a bool, not a string)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name}={value!r} must be a number, not {type(value).__name__}, e.g. {example}")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number (not nan or inf), e.g. {example}")


def _check_patterns(name: str, value: object, check_value) -> dict:
    """`{regex: value}` with string keys; each value checked by `check_value(label, value)`."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"{name}={value!r} must be a dict {{module name pattern: value}}, e.g. {{'q_proj': 16}}")
    for key, item in value.items():
        if not isinstance(key, str):
            raise TypeError(f"{name} key {key!r} must be a string (a module name or regex), e.g. 'q_proj'")
        check_value(f"{name}[{key!r}]", item)
    return value


def _check_names(name: str, value: object) -> list[str] | str | None:
    """None, a string (a regex, or 'all-linear'), or a list/tuple/set of name strings (returned as a list)."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, (list, tuple, set)):
        raise TypeError(f"{name}={value!r} must be a list of names or a regex string, e.g. ['q_proj', 'v_proj']")
    wrong = [item for item in value if not isinstance(item, str)]
    if wrong:
        raise TypeError(f"{name}={value!r} holds {wrong[0]!r}, which is not a string; give module names as "
                        "strings, e.g. ['q_proj', 'v_proj']")
    return sorted(value) if isinstance(value, set) else list(value)


def _check_layers(value: object) -> list[int] | None:
    """None, a layer index, or a list of layer indices (non-negative integers)."""
    if value is None:
        return None
    items = [value] if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value
    if not isinstance(items, (list, tuple)) or any(
            not isinstance(i, numbers.Integral) or isinstance(i, bool) or i < 0 for i in items):
        raise TypeError(f"layers_to_transform={value!r} must be a layer index or a list of them "
                        "(non-negative integers), e.g. [0, 1, 2]")
    return [int(i) for i in items]


def _compile(pattern: str, what: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(
            f"{what}={pattern!r} is not a valid regular expression ({err}); "
            "pass a list of names like ['q_proj', 'v_proj'], or fix the regex"
        ) from None


def _pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    """PEFT's rule: a key matches when the module name ends with it (after a dot), as a regex."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None
