"""Hooks into training frameworks. Importing this module imports transformers.

    trainer = Trainer(model=lora_model, ..., callbacks=[SaveAdapterCallback()])

Trainer does not know `LoraModel`, so its checkpoints hold a plain state dict; this callback also
writes the active adapter in PEFT's format into each `checkpoint-<step>` folder, where PEFT,
`LoraModel.from_pretrained` and servers that read PEFT adapters can load it.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from qlora_inject.model import LoraModel


class SaveAdapterCallback(TrainerCallback):
    """Save the adapter (PEFT's format) into every Trainer checkpoint folder.

    Under `accelerate launch` every rank runs it: `save_pretrained` writes from rank 0 only, gathering
    an FSDP-sharded adapter first, while the other ranks wait.
    """

    def on_save(self, args, state, control, model=None, **kwargs):
        lora_model = model
        while lora_model is not None and not isinstance(lora_model, LoraModel):
            lora_model = getattr(lora_model, "module", None)                   # DDP / accelerate wrappers
        if lora_model is None:
            raise TypeError(f"SaveAdapterCallback needs a qlora_inject.LoraModel; the Trainer holds a "
                            f"{type(model).__name__}")
        lora_model.save_pretrained(Path(args.output_dir) / f"checkpoint-{state.global_step}")
        return control
