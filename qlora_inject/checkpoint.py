"""Training checkpoints of `qlora-inject train`: safetensors and JSON only, never a pickle.

A checkpoint is the folder `<output>/checkpoint`:

    adapter_model.safetensors, adapter_config.json   the adapter, in PEFT's format
    trainer_state.safetensors                         optimizer tensors and every RNG state
    trainer_state.json                                step, losses, the run's settings, optimizer groups

It is written whole into a staging sibling and swapped into place (`atomic_files.replace_folder`),
so a run killed at any moment leaves one whole checkpoint, the previous or the new. Staging folders
left by a killed write are removed by the next write (as are the `.checkpoint-<step>-XXXXXXXX` and
`.checkpoint-old` folders earlier versions left). Folders and files get the mode the user's umask
gives, as any file the user writes.

With more than one process (DDP, FSDP) every rank calls `write_checkpoint`: a sharded adapter and
optimizer state are gathered to full tensors, each rank's dropout RNG state is collected, rank 0
writes, the others wait. The run's settings record the world size; a resume must repeat it.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

FORMAT = "qlora-inject-trainer-state/1"
CHECKPOINT = "checkpoint"
LEGACY_PREVIOUS = f".{CHECKPOINT}-old"                  # earlier versions' two-rename scheme
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LEGACY_STATE = "trainer_state.pt"                        # a pickle, written before FORMAT 1: never read
_LEGACY_STAGING = re.compile(rf"\.{CHECKPOINT}-\d+-[A-Za-z0-9_]{{8}}")   # earlier versions' mkdtemp folders
_RNG = "rng."


@dataclass
class TrainerState:
    """What a checkpoint holds besides the adapter."""

    step: int
    losses: list[float]
    settings: dict[str, Any]
    optimizer: dict[str, Any]                            # torch's `Optimizer.state_dict()` form
    rng: dict[str, Tensor]                               # "rng.torch", "rng.data", "rng.cuda.<i>"


def remove_legacy_staging(output: Path) -> list[Path]:
    """Remove the staging folders earlier versions' killed writes left in `output` (only their names)."""
    stale = [p for p in output.iterdir() if p.is_dir() and not p.is_symlink() and _LEGACY_STAGING.fullmatch(p.name)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def capture_rng(data_order: torch.Generator) -> dict[str, Tensor]:
    """Every RNG state the loop draws from: torch's global CPU one (dropout), CUDA's, and the data order.

    With more than one process (every rank calls it) the other ranks' CPU states are kept too, as
    `rng.torch.rank<r>`: each rank draws its own dropout masks. The data order is the same on all ranks.
    """
    from qlora_inject.distributed import all_gather_tensor

    ranks = all_gather_tensor(torch.get_rng_state())
    states = {f"{_RNG}torch": ranks[0], f"{_RNG}data": data_order.get_state()}
    states.update({f"{_RNG}torch.rank{r}": state for r, state in enumerate(ranks) if r})
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            states[f"{_RNG}cuda.{index}"] = state
    return states


def restore_rng(states: dict[str, Tensor], data_order: torch.Generator, rank: int = 0) -> None:
    """Set the RNG states `capture_rng` took (CUDA's only where this machine has as many devices);
    `rank` picks that process's CPU state."""
    own = states.get(f"{_RNG}torch.rank{rank}") if rank else None
    if rank and (own is None or not _valid_generator_state(own)):
        raise ValueError(f"the checkpoint has no valid RNG state for rank {rank}; resume with the world size it "
                         "was written with, or start over without --resume")
    torch.set_rng_state(states[f"{_RNG}torch"] if own is None else own)
    data_order.set_state(states[f"{_RNG}data"])
    cuda = [states[k] for k in sorted(states) if k.startswith(f"{_RNG}cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        try:
            torch.cuda.set_rng_state_all(cuda)
        except RuntimeError as err:
            raise ValueError(f"the checkpoint's CUDA RNG states are not valid ({err}); start over without --resume") \
                from None


def write_checkpoint(output: Path, lora_model, optimizer: torch.optim.Optimizer, step: int, losses: list[float],
                     data_order: torch.Generator, settings: dict[str, Any] | None = None) -> Path:
    """Write adapter + trainer state to `output/checkpoint` as one unit; return that folder.

    With more than one process every rank must call it (in step): rank 0 writes, the others wait.
    """
    from safetensors.torch import save

    from qlora_inject import distributed
    from qlora_inject.adapter_io import adapter_files, adapter_state_dict, write_files
    from qlora_inject.atomic_files import replace_folder

    name = lora_model.active_adapters[0]
    config = lora_model.peft_config[name]
    adapter = None
    optimizer_state = optimizer.state_dict()
    if distributed.is_sharded(lora_model.model):                    # collectives: every rank, same order
        adapter = distributed.gather_full(adapter_state_dict(lora_model.model, name, config.bias))
        optimizer_state = {**optimizer_state, "state": {
            index: {**values, **distributed.gather_full({k: v for k, v in values.items() if isinstance(v, Tensor)})}
            for index, values in optimizer_state["state"].items()}}
    rng = capture_rng(data_order)
    final = output / CHECKPOINT
    try:
        if distributed.is_main_process():
            output.mkdir(parents=True, exist_ok=True)
            remove_legacy_staging(output)
            files = adapter_files(lora_model.model, config, name, adapter)
            tensors, groups = _split_optimizer(optimizer_state)
            tensors.update(rng)
            files[STATE_TENSORS] = save(tensors, metadata={"format": "pt"})
            document = {"format": FORMAT, "step": step, "losses": losses, "settings": settings or {},
                        "optimizer": groups}
            files[STATE_JSON] = (json.dumps(document, indent=1) + "\n").encode()
            final = replace_folder(output / CHECKPOINT, lambda staging: write_files(staging, files))
            shutil.rmtree(output / LEGACY_PREVIOUS, ignore_errors=True)
    finally:                                                        # a failed write must not hang the others
        distributed.barrier()
    return final


def latest_checkpoint(output: Path) -> Path | None:
    """The checkpoint to resume from (put back first if a write was killed mid-swap)."""
    from qlora_inject.atomic_files import recover_folder

    recover_folder(output / CHECKPOINT)
    for candidate in (output / CHECKPOINT, output / LEGACY_PREVIOUS):           # the latter: refused as old
        if candidate.is_dir():
            return candidate
    return None


def read_trainer_state(folder: Path) -> TrainerState:
    """Read and check a checkpoint's trainer state; nothing is unpickled.

    Raises:
        ValueError: The state is in the old pickle format, missing, damaged or inconsistent, naming the file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / STATE_JSON
    if not path.is_file():
        if (folder / LEGACY_STATE).exists():
            raise ValueError(f"{str(folder)!r} is a checkpoint in the old format ({LEGACY_STATE}, a pickle file, "
                             "which is never read: it could run code); start over without --resume")
        raise ValueError(f"{str(folder)!r} has no {STATE_JSON}; it is not a whole checkpoint, start over without "
                         "--resume")
    damaged = f"{path} is damaged"
    try:
        document = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{damaged}: not UTF-8 JSON ({err}); start over without --resume") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(f"{damaged}: not a {FORMAT!r} object; start over without --resume")
    step, losses = document.get("step"), document.get("losses")
    settings, groups = document.get("settings"), document.get("optimizer")
    if not (isinstance(step, int) and step >= 0 and isinstance(losses, list) and len(losses) == step
            and all(isinstance(x, float | int) and not isinstance(x, bool) for x in losses)
            and isinstance(settings, dict) and isinstance(groups, dict)):
        raise ValueError(f"{damaged}: step, losses (one number per step), settings or optimizer are missing or "
                         "wrong; start over without --resume")
    try:
        tensors = load_file(folder / STATE_TENSORS)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{folder / STATE_TENSORS} is missing or damaged ({err}); start over without --resume") \
            from None
    rng = {k: v for k, v in tensors.items() if k.startswith(_RNG)}
    for key in (f"{_RNG}torch", f"{_RNG}data"):
        if key not in rng or rng[key].dtype != torch.uint8 or rng[key].shape != torch.get_rng_state().shape \
                or not _valid_generator_state(rng[key]):
            raise ValueError(f"{folder / STATE_TENSORS} has no valid {key!r} state; start over without --resume")
    optimizer = _join_optimizer(groups, {k: v for k, v in tensors.items() if not k.startswith(_RNG)}, damaged)
    return TrainerState(step, [float(x) for x in losses], settings, optimizer, rng)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any], source: Path) -> None:
    """`optimizer.load_state_dict(state)`, after checking each tensor has its parameter's shape."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, values in state["state"].items():
        for name, value in values.items():
            if not 0 <= index < len(params) or (isinstance(value, Tensor) and value.dim() > 0
                                                and value.shape != params[index].shape):
                raise ValueError(f"{source} does not fit this model: optimizer state {index}.{name} "
                                 f"({tuple(getattr(value, 'shape', ()))}) belongs to no parameter of that shape; "
                                 "start over without --resume")
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{source} does not fit this model's optimizer ({err}); start over without --resume") \
            from None


def _valid_generator_state(state: Tensor) -> bool:
    try:
        torch.Generator().set_state(state)                # a scratch generator: checks, changes nothing
    except RuntimeError:
        return False
    return True


def _split_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Optimizer tensors as `optimizer.<param index>.<name>`; the param groups (and any numbers) as JSON."""
    tensors, numbers = {}, {}
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{index}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                numbers.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "numbers": numbers}


def _join_optimizer(groups: dict[str, Any], tensors: dict[str, Tensor], damaged: str) -> dict[str, Any]:
    param_groups, numbers = groups.get("param_groups"), groups.get("numbers", {})
    if not (isinstance(param_groups, list) and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                                   for g in param_groups) and isinstance(numbers, dict)):
        raise ValueError(f"{damaged}: its optimizer param_groups are missing or wrong; start over without --resume")
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        match = re.fullmatch(r"optimizer\.(\d+)\.(\w+)", key)
        if match is None:
            raise ValueError(f"{damaged}: unexpected tensor {key!r} in {STATE_TENSORS}; start over without --resume")
        state.setdefault(int(match[1]), {})[match[2]] = value
    for index, values in numbers.items():
        if not (index.isdigit() and isinstance(values, dict)):
            raise ValueError(f"{damaged}: optimizer numbers {index!r} are wrong; start over without --resume")
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": param_groups}


__all__ = ["CHECKPOINT", "TrainerState", "latest_checkpoint", "load_optimizer_state", "read_trainer_state",
           "remove_legacy_staging", "restore_rng", "write_checkpoint"]
