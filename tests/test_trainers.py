"""transformers' Trainer and TRL's SFTTrainer train a LoraModel over a 4-bit Llama, checkpointing on."""

from __future__ import annotations

import json

import torch

from qlora_inject import LoraConfig, LoraModel
from qlora_inject.adapter_io import WEIGHTS_NAME

from conftest import requires
from factories import load_tiny_llama

pytestmark = [requires("transformers"), requires("bitsandbytes"), requires("datasets")]

TEXT = ("The quick brown fox jumps over the lazy dog. " * 8).strip()


def rows(count: int = 16) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 32, (24,), generator=generator).tolist()} for _ in range(count)]


def train_and_check(trainer, model: LoraModel, tmp_path) -> None:
    """Train 12 steps; the loss falls, checkpointing was on, and the adapter saves in PEFT's format."""
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12 and min(losses[-3:]) < losses[0]
    assert model.model.is_gradient_checkpointing
    model.save_pretrained(tmp_path / "adapter")
    assert_peft_adapter(tmp_path / "adapter")


def assert_peft_adapter(directory) -> None:
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    from safetensors.torch import load_file

    keys = list(load_file(directory / WEIGHTS_NAME))
    assert keys and all(k.startswith("base_model.model.") and ".default." not in k for k in keys)


def test_hf_trainer_with_gradient_checkpointing(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = LoraModel(load_tiny_llama("nf4"), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    arguments = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=12, per_device_train_batch_size=4,
                                  learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[],
                                  gradient_checkpointing=True, use_cpu=True, remove_unused_columns=False)
    trainer = Trainer(model=model, args=arguments, train_dataset=Dataset.from_list(rows()),
                      data_collator=_causal_collator)
    train_and_check(trainer, model, tmp_path)


def test_trainer_checkpoints_hold_a_peft_adapter(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from qlora_inject.integrations import SaveAdapterCallback

    model = LoraModel(load_tiny_llama("nf4"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    arguments = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4,
                                  learning_rate=1e-2, save_strategy="steps", save_steps=2, report_to=[],
                                  use_cpu=True, remove_unused_columns=False)
    Trainer(model=model, args=arguments, train_dataset=Dataset.from_list(rows()), data_collator=_causal_collator,
            callbacks=[SaveAdapterCallback()]).train()
    for step in (2, 4):
        assert_peft_adapter(tmp_path / "run" / f"checkpoint-{step}")
    reloaded = LoraModel.from_pretrained(load_tiny_llama("nf4"), tmp_path / "run" / "checkpoint-4")
    torch.testing.assert_close(reloaded.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight,
                               model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight)


def _causal_collator(features: list[dict]) -> dict:
    ids = torch.tensor([f["input_ids"] for f in features])
    return {"input_ids": ids, "labels": ids.clone()}


def char_tokenizer():
    """A character-level fast tokenizer built in memory (no download), within the tiny Llama's 128 ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = sorted(set(TEXT))
    vocab = {"<unk>": 0, "<pad>": 1, "<eos>": 2, **{c: i + 3 for i, c in enumerate(characters)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


@requires("trl")
def test_trl_sft_trainer_with_gradient_checkpointing(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer = char_tokenizer()
    assert len(tokenizer) < 128 and tokenizer("fox")["input_ids"] == [tokenizer.convert_tokens_to_ids(c) for c in "fox"]
    model = LoraModel(load_tiny_llama("nf4"), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    arguments = SFTConfig(output_dir=str(tmp_path / "run"), max_steps=12, per_device_train_batch_size=4,
                          learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], max_length=48,
                          gradient_checkpointing=True, use_cpu=True)
    dataset = Dataset.from_list([{"text": TEXT[i:i + 60]} for i in range(0, 240, 15)])
    trainer = SFTTrainer(model=model, args=arguments, train_dataset=dataset, processing_class=tokenizer)
    train_and_check(trainer, model, tmp_path)
