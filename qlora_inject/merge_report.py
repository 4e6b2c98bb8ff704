"""What a merge keeps of a fine-tune: the held-out loss of the base, the adapter and the merged model.

A merge into a quantized format requantizes W + s·BA; where the update is small beside the format's
rounding step, much of it rounds away. The per-layer merge error (relative error, SQNR) does not say
how much of what was learned is gone; the held-out loss does:

    gain kept = (loss_base − loss_merged) / (loss_base − loss_adapter)

`measure_merge` merges in the base's format, measures, and unmerges (the original bases come back bit
for bit); `MergeGain.warning` is one line when less than half of the gain is kept.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

KEPT_AT_LEAST = 0.5                                    # below this share of the gain, a merge warns


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


def measure_merge(lora_model, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> MergeGain:
    """Held-out loss of the base, of the base with the active adapter, and of the adapter merged in the
    base's own format (`merge_adapter`); the model is unmerged again before this returns."""
    with lora_model.disable_adapter():
        base = held_out_loss(lora_model, batches)
    adapter = held_out_loss(lora_model, batches)
    lora_model.merge_adapter()
    try:
        merged = held_out_loss(lora_model, batches)
    finally:
        lora_model.unmerge_adapter()
    if not all(map(math.isfinite, (base, adapter, merged))):
        raise ValueError(f"a held-out loss is not finite (base {base}, adapter {adapter}, merged {merged})")
    return MergeGain(base, adapter, merged)


def default_held_out(adapter: Path, batch_size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The training run's held-out split, when `adapter` came from the default job (SmolLM2 on the
    date task: its config names `smollm2` as the base); None for any other adapter."""
    from qlora_inject.date_task import DateTask, _tokenize, collate, encode
    from qlora_inject.pretrained import SMOLLM2, model_directory

    try:
        base = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None                                    # the adapter load itself reports what is wrong
    if base != SMOLLM2:
        return None
    task = DateTask(model_directory(SMOLLM2), batch_size)
    encoded = encode(task.held_out, _tokenize(task.tokenizer))
    return [collate(encoded[start:start + batch_size], task.pad_id) for start in range(0, len(encoded), batch_size)]
