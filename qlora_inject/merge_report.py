"""What a merge keeps of a fine-tune: the held-out loss of the base, the adapter and the merged model.

A merge into a quantized format requantizes W + s·BA; where the update is small beside the format's
rounding step, much of it rounds away. The per-layer merge error (relative error, SQNR) does not say
how much of what was learned is gone; the held-out loss does:

    gain kept = (loss_base − loss_merged) / (loss_base − loss_adapter)

`LoraModel.merge_adapter(held_out=batches)` merges and measures (`merge_measured`): its result, each
layer's merge error as before, also holds the `MergeGain`, and a `MergeLossWarning` of one line says
when less than half of the gain is kept. `measure_merge` does the same and unmerges again (the original
bases come back bit for bit).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

KEPT_AT_LEAST = 0.5                                    # below this share of the gain, a merge warns
Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]  # held-out `(input_ids, labels)`, labels -100 where unscored


class MergeLossWarning(UserWarning):
    """A merge into the quantized format kept less than half of the adapter's held-out gain."""


@dataclass(frozen=True)
class MergeGain:
    """Held-out losses (mean over the labelled tokens) before and after a merge."""

    base: float
    adapter: float
    merged: float

    @property
    def kept(self) -> float:
        """The share of the adapter's held-out gain the merged model keeps (1.0 when there was no gain)."""
        gain = self.base - self.adapter
        return 1.0 if not gain > 0 else (self.base - self.merged) / gain

    def __str__(self) -> str:
        return (f"held-out loss: base {self.base:.4f}, with the adapter {self.adapter:.4f}, merged {self.merged:.4f} "
                f"(the merge keeps {self.kept:.0%} of the adapter's gain)")

    def warning(self, fmt: str = "the quantized format") -> str | None:
        """One line when the merge keeps less than `KEPT_AT_LEAST` of the gain, else None."""
        if self.kept >= KEPT_AT_LEAST:
            return None
        return (f"warning: merged into {fmt}, the model keeps {self.kept:.0%} of the adapter's held-out gain "
                f"(loss {self.base:.4f} base, {self.adapter:.4f} adapter, {self.merged:.4f} merged); "
                "merge with --dequantize (merge_and_unload(dequantize=True)) to keep all of it")


@torch.no_grad()
def held_out_loss(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean next-token loss over the labelled tokens (-100 ignored) of `(input_ids, labels)` batches."""
    from qlora_inject.backends.bnb import never_repack
    from qlora_inject.loss import causal_lm_loss, why_not_chunked

    never_repack(model)                                # eval mode must not make bare 4-bit layers untrainable
    chunked = why_not_chunked(model) is None
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for input_ids, labels in batches:
        input_ids, labels = input_ids.to(device), labels.to(device)
        tokens = int((labels[:, 1:] != -100).sum())
        loss = causal_lm_loss(model, input_ids, labels) if chunked else model(input_ids=input_ids, labels=labels).loss
        total += float(loss) * tokens
        count += tokens
    model.train(was_training)
    if count == 0:
        raise ValueError("the held-out batches hold no labelled token (every label is -100); give some to score")
    return total / count


class MergeReport(dict):
    """What `merge_adapter` returns: each merged layer's error (`MergeResult` by module name), and, when
    held-out batches were given, `gain`: the held-out loss of the base, the adapter and the merged model."""

    gain: MergeGain | None = None


def merge_measured(lora_model, held_out: Batches, adapter_names: list[str] | None = None,
                   warn: bool = True) -> MergeReport:
    """Merge the active adapters in the bases' own formats, measuring the held-out loss before and after.

    The base's loss is the model's with its adapters disabled; the adapter's, the model's as it is (its
    active adapters), which is what the merge folds in.

    Raises:
        ValueError: `adapter_names` other than the active adapters (the loss measured would not be theirs),
            or held-out batches without a labelled token, or a loss that is not finite.
    """
    from qlora_inject.lora import LoraLinear
    from qlora_inject.merge import merge

    active = list(lora_model.active_adapters)
    if adapter_names is not None and sorted(adapter_names) != sorted(active):
        raise ValueError(f"merge_adapter(adapter_names={adapter_names}, held_out=...): the held-out loss is measured "
                         f"with the active adapters {active}; call set_adapter({adapter_names!r}) first, or drop "
                         "adapter_names")
    with lora_model.disable_adapter():
        base = held_out_loss(lora_model, held_out)
    adapter = held_out_loss(lora_model, held_out)
    report = MergeReport(merge(lora_model.model, adapter_names))
    merged = held_out_loss(lora_model, held_out)
    if not all(map(math.isfinite, (base, adapter, merged))):
        raise ValueError(f"a held-out loss is not finite (base {base}, adapter {adapter}, merged {merged})")
    report.gain = MergeGain(base, adapter, merged)
    formats = sorted({m.backend.name for m in lora_model.modules() if isinstance(m, LoraLinear)})
    line = report.gain.warning(", ".join(formats) or "the quantized format")
    if warn and line is not None:
        warnings.warn(line, MergeLossWarning, stacklevel=3)
    return report


def measure_merge(lora_model, batches: Batches) -> MergeGain:
    """Held-out loss of the base, of the base with the active adapter, and of the adapter merged in the
    base's own format (`merge_measured`, without the warning); the model is unmerged again before this returns."""
    try:
        return merge_measured(lora_model, batches, warn=False).gain
    finally:
        lora_model.unmerge_adapter()


def default_held_out(adapter: Path, batch_size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The training run's held-out split, when `adapter` came from the default job (SmolLM2 on the
    date task: its config names `smollm2` as the base); None for any other adapter."""
    from qlora_inject.pretrained import SMOLLM2, model_directory

    try:
        base = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None                                    # the adapter load itself reports what is wrong
    if base != SMOLLM2:
        return None
    return date_task_held_out(model_directory(SMOLLM2), batch_size)


def date_task_held_out(model_dir: Path, batch_size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The date task's held-out examples as `(input_ids, labels)` batches, with `model_dir`'s tokenizer."""
    from qlora_inject.date_task import DateTask, _tokenize, collate, encode

    task = DateTask(model_dir, batch_size)
    encoded = encode(task.held_out, _tokenize(task.tokenizer))
    return [collate(encoded[start:start + batch_size], task.pad_id) for start in range(0, len(encoded), batch_size)]
