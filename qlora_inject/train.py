"""`qlora-inject train`: LoRA fine-tuning of a quantized causal LM, resumable, with a built-in default.

With no model given, a Llama-architecture model is built from a small config (random weights, a
256-token byte vocabulary), quantized to the chosen format, and trained on the corpus shipped in
the package: no download. Checkpoints (adapter + optimizer + data-order state) are written to a
temporary folder and renamed into place, so a run killed at any moment resumes from the last one.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

QUANTS = ("nf4", "fp4", "int8", "gptq", "awq", "hqq", "none")
CHECKPOINT = "checkpoint"
STATE_FILE = "trainer_state.pt"


class UsageError(Exception):
    """Bad command-line input: reported as one line, never a traceback."""


@dataclass
class TrainOptions:
    """Settings of one training run (the command's flags)."""

    model: Path | None = None
    quant: str = "nf4"
    r: int = 16
    alpha: float = 32
    target_modules: str = "all-linear"
    steps: int = 200
    lr: float = 3e-3
    batch_size: int = 8
    seq_len: int = 128
    data: Path | None = None
    output: Path = Path("runs/train")
    resume: bool = False
    save_every: int = 50
    seed: int = 0
    progress: bool = True
    fuse: bool = True                                  # fuse_llama_ops: one autograd op per RMSNorm and MLP gate


@dataclass
class TrainResult:
    losses: list[float]
    start_step: int
    output: Path
    tokens_per_second: float
    log: list[str] = field(default_factory=list)


# --- data ----------------------------------------------------------------------------------------

def read_corpus(path: Path | None) -> str:
    """The training text: a UTF-8 text file, a JSONL file (each line's "text"), or the shipped corpus."""
    if path is None:
        return resources.files("qlora_inject.data").joinpath("corpus.txt").read_text(encoding="utf-8")
    if not path.is_file():
        raise UsageError(f"--data {str(path)!r} does not exist or is not a file; give a text or JSONL file")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"--data {str(path)!r} is not UTF-8 text; give a text or JSONL file") from None
    if path.suffix in (".jsonl", ".json"):
        texts = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UsageError(f"--data {str(path)!r} line {number} is not JSON ({err.msg}); "
                                 "give one JSON object with a \"text\" field per line") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UsageError(f"--data {str(path)!r} line {number} has no string \"text\" field")
            texts.append(record["text"])
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise UsageError(f"--data {str(path)!r} holds no text")
    return raw


def byte_tokens(text: str) -> list[int]:
    return list(text.encode("utf-8"))


# --- model ---------------------------------------------------------------------------------------

def quiet_transformers() -> None:
    """No progress bars or info logs from transformers: the command prints its own."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def build_default_model(directory: Path, seed: int = 0, hidden: int = 256, layers: int = 4) -> Path:
    """Save the built-in model: Llama architecture, random weights, 256-token byte vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    quiet_transformers()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def load_model(path: Path, quant: str):
    """Load a local causal LM in format `quant` (bitsandbytes through transformers, others quantized here)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quiet_transformers()
    if quant not in QUANTS:
        raise UsageError(f"--quant {quant!r} is not one of {', '.join(QUANTS)}")
    if not (path / "config.json").is_file():
        raise UsageError(f"--model {str(path)!r} is not a Hugging Face model directory (no config.json there)")
    bnb = {
        "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=torch.float32),
        "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
        "int8": dict(load_in_8bit=True),
    }
    if quant in bnb:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(**bnb[quant]),
                                                     device_map=device)
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
        if quant != "none":
            from qlora_inject.quantize import quantize_model

            quantize_model(model, quant, group_size=32 if model.config.hidden_size < 512 else 128)
    return model


def tokenizer_for(path: Path | None, vocab_size: int) -> Callable[[str], list[int]]:
    """The model's own tokenizer, or bytes for the built-in model (or one whose vocabulary covers them)."""
    if path is not None:
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path)
            return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
        except (OSError, ValueError):
            if vocab_size < 256:
                raise UsageError(f"--model {str(path)!r} has no tokenizer and a vocabulary of {vocab_size} < 256 "
                                 "byte tokens; add its tokenizer files to the directory") from None
    return byte_tokens


# --- checkpoints ---------------------------------------------------------------------------------

def write_checkpoint(output: Path, lora_model, optimizer, step: int, losses: list[float],
                     generator: torch.Generator) -> Path:
    """Write adapter + trainer state to `output/checkpoint`, atomically (temp folder, then renames)."""
    from qlora_inject.adapter_io import save_adapter

    output.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT}-{step}-", dir=output))
    name = lora_model.active_adapters[0]
    save_adapter(lora_model.model, staging, lora_model.peft_config[name], name)
    torch.save({"step": step, "losses": losses, "optimizer": optimizer.state_dict(),
                "generator": generator.get_state()}, staging / STATE_FILE)
    final, old = output / CHECKPOINT, output / f".{CHECKPOINT}-old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(output: Path) -> Path | None:
    """The checkpoint to resume from (the previous one if a run died between two renames)."""
    for candidate in (output / CHECKPOINT, output / f".{CHECKPOINT}-old"):
        if (candidate / STATE_FILE).is_file():
            return candidate
    return None


# --- the run -------------------------------------------------------------------------------------

def train(options: TrainOptions, log: Callable[[str], None] = print) -> TrainResult:
    """Run one training job; return the per-step losses."""
    from qlora_inject import LoraConfig, LoraModel
    from qlora_inject.adapter_io import check_and_copy, read_adapter
    from qlora_inject.fused_ops import fuse_llama_ops
    from qlora_inject.loss import causal_lm_loss, why_not_chunked

    _check(options)
    checkpoint = latest_checkpoint(options.output) if options.resume else None
    if options.resume and checkpoint is None:
        raise UsageError(f"--resume: no checkpoint in {str(options.output)!r}; run without --resume to start")
    if options.model is None:
        with tempfile.TemporaryDirectory(prefix="qlora-inject-model-") as tmp:
            model = load_model(build_default_model(Path(tmp), options.seed), options.quant)
    else:
        model = load_model(options.model, options.quant)
    tokenize = tokenizer_for(options.model, model.config.vocab_size)
    tokens = torch.tensor(tokenize(read_corpus(options.data)), dtype=torch.long)
    if len(tokens) <= options.seq_len + 1:
        raise UsageError(f"the data holds {len(tokens)} tokens, fewer than --seq-len {options.seq_len} + 2; "
                         "give more text or a shorter --seq-len")

    targets = options.target_modules if options.target_modules == "all-linear" else \
        [t.strip() for t in options.target_modules.split(",") if t.strip()]
    if checkpoint is not None:
        config, saved = read_adapter(checkpoint)
        lora_model = LoraModel(model, config)
        check_and_copy(lora_model.model, saved, "default")
    else:
        config = LoraConfig(r=options.r, lora_alpha=options.alpha, target_modules=targets, lora_dropout=0.05,
                            task_type="CAUSAL_LM")
        lora_model = LoraModel(model, config)
    if options.fuse:
        log(str(fuse_llama_ops(lora_model)))
    trainable, total = lora_model.get_nb_trainable_parameters()
    log(f"{len(lora_model.reports['default'])} layers wrapped {lora_model.reports['default'].backends()}; "
        f"trainable {trainable:,} of {total:,} parameters; {len(tokens):,} training tokens")

    optimizer = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad], lr=options.lr)
    generator = torch.Generator().manual_seed(options.seed)
    losses: list[float] = []
    start = 0
    if checkpoint is not None:
        state = torch.load(checkpoint / STATE_FILE, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        losses, start = list(state["losses"]), int(state["step"])
        log(f"resumed from {checkpoint} at step {start}")
    device = next(p.device for p in lora_model.parameters() if p.requires_grad)

    reason = why_not_chunked(lora_model)
    if reason is None:
        def loss_of(batch: torch.Tensor) -> torch.Tensor:                 # no full (tokens × vocabulary) logits
            return causal_lm_loss(lora_model, batch)
    else:
        log(f"loss: the model's own ({reason})")

        def loss_of(batch: torch.Tensor) -> torch.Tensor:
            return lora_model(input_ids=batch, labels=batch).loss

    lora_model.train()
    began, seen = time.perf_counter(), 0
    bar = _progress(range(start, options.steps), options.progress, start, options.steps)
    for step in bar:
        offsets = torch.randint(0, len(tokens) - options.seq_len - 1, (options.batch_size,), generator=generator)
        batch = torch.stack([tokens[o:o + options.seq_len] for o in offsets.tolist()]).to(device)
        loss = loss_of(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        seen += batch.numel()
        rate = seen / (time.perf_counter() - began)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{losses[-1]:.4f}", tokens_per_s=f"{rate:,.0f}")
        if (step + 1) % options.save_every == 0 and step + 1 < options.steps:
            write_checkpoint(options.output, lora_model, optimizer, step + 1, losses, generator)
    rate = seen / max(time.perf_counter() - began, 1e-9)

    write_checkpoint(options.output, lora_model, optimizer, options.steps, losses, generator)
    lora_model.save_pretrained(options.output)
    (options.output / "losses.json").write_text(json.dumps(losses))
    plot_losses(losses, options.output / "loss_curve.png")
    if losses:
        log(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over steps {start + 1}-{options.steps}; "
            f"{rate:,.0f} tokens/s; adapter in {options.output}")
    return TrainResult(losses, start, options.output, rate)


def plot_losses(losses: list[float], path: Path) -> None:
    """Write the loss curve as a PNG (skipped, with no error, when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot(range(1, len(losses) + 1), losses, linewidth=1)
    axis.set_xlabel("step")
    axis.set_ylabel("training loss")
    axis.set_title("qlora-inject train")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _check(options: TrainOptions) -> None:
    for name in ("steps", "r", "batch_size", "seq_len", "save_every"):
        value = getattr(options, name)
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')} {value} must be at least 1")
    if not (options.lr > 0 and math.isfinite(options.lr)):
        raise UsageError(f"--lr {options.lr} must be a positive number, e.g. 3e-3")
    if options.quant not in QUANTS:
        raise UsageError(f"--quant {options.quant!r} is not one of {', '.join(QUANTS)}")
    if options.model is not None and not options.model.exists():
        raise UsageError(f"--model {str(options.model)!r} does not exist; give a local Hugging Face model directory")


def _progress(steps: range, enabled: bool, start: int, total: int):
    if not enabled:
        return steps
    try:
        from tqdm import tqdm
    except ImportError:
        return steps
    return tqdm(steps, initial=start, total=total, desc="train", unit="step", dynamic_ncols=True)
