"""Adapter files: PEFT's format both ways, atomic writes, and loads that check before they touch."""

from __future__ import annotations

import json
import os

import pytest
import torch

from qlora_inject import LoraConfig, LoraModel, atomic_files

from conftest import requires
from factories import LLAMA_PROJECTIONS, load_tiny_llama, quant_params
from parity import assert_same_state, clone_state

pytestmark = [requires("transformers"), requires("peft")]

CONFIGS = {
    "list": dict(r=4, lora_alpha=8, target_modules=LLAMA_PROJECTIONS),
    "patterns": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"down_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.v_proj": 3}),
    "rslora-regex": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=r".*\.(q|k)_proj"),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "up_proj"]),
}
QUANTS = quant_params("none", "nf4", "int8", "hqq", "gptq", "awq")
PEFT_HAS_NO_DORA = ("gptq", "awq")
TOL = {"int8": {"atol": 2e-3, "rtol": 2e-3}, "awq": {"atol": 5e-3, "rtol": 5e-3}}   # base rounding differs (fp16)
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))


def trained(model: LoraModel) -> LoraModel:
    """Give every adapter weight a random value, so a lost or swapped tensor shows in the output."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.normal_(std=0.2)
    return model


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("config", list(CONFIGS), ids=str)
def test_peft_loads_what_we_save(tmp_path, quant, config):
    import peft

    if config == "dora" and quant in PEFT_HAS_NO_DORA:
        pytest.skip(f"PEFT 0.21 refuses DoRA on {quant}")
    ours = trained(LoraModel(load_tiny_llama(quant), LoraConfig(**CONFIGS[config])))
    ours.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    theirs = peft.PeftModel.from_pretrained(load_tiny_llama(quant), tmp_path)
    torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, **TOL.get(quant, {}))


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("config", list(CONFIGS), ids=str)
def test_we_load_what_peft_saves(tmp_path, quant, config):
    import peft

    if config == "dora" and quant in PEFT_HAS_NO_DORA:
        pytest.skip(f"PEFT 0.21 refuses DoRA on {quant}")
    theirs = peft.get_peft_model(load_tiny_llama(quant), peft.LoraConfig(**CONFIGS[config]))
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if ".lora_" in name:
                param.normal_(std=0.2)
    theirs.save_pretrained(tmp_path)
    ours = LoraModel.from_pretrained(load_tiny_llama(quant), tmp_path)
    torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, **TOL.get(quant, {}))
    assert not any(p.requires_grad for p in ours.parameters())               # loaded for inference
    trainable = LoraModel.from_pretrained(load_tiny_llama(quant), tmp_path, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_round_trip_here_and_load_adapter_under_another_name(tmp_path):
    source = trained(LoraModel(load_tiny_llama(), LoraConfig(**CONFIGS["patterns"])))
    source.save_pretrained(tmp_path)
    expected = source(input_ids=IDS).logits
    target = LoraModel(load_tiny_llama(), LoraConfig(r=2, target_modules=["o_proj"]))
    target.load_adapter(tmp_path, adapter_name="loaded")
    assert target.active_adapters == ["default"]
    target.set_adapter("loaded")
    torch.testing.assert_close(target(input_ids=IDS).logits, expected)


def test_modules_to_save_round_trip_with_peft(tmp_path):
    import peft

    config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    ours = trained(LoraModel(load_tiny_llama(), config))
    with torch.no_grad():
        ours.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(load_tiny_llama(), tmp_path)
    torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits)


@pytest.mark.parametrize("step", ["_exchange", "_fsync_tree"])
def test_a_save_killed_midway_leaves_the_previous_adapter(tmp_path, monkeypatch, step):
    directory = tmp_path / "adapter"
    first = trained(LoraModel(load_tiny_llama(), LoraConfig(**CONFIGS["list"])))
    first.save_pretrained(directory)
    saved = {p: p.read_bytes() for p in directory.iterdir()}
    second = trained(LoraModel(load_tiny_llama(), LoraConfig(**CONFIGS["list"])))

    def die(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(atomic_files, step, die)                              # dies before the swap
    with pytest.raises(KeyboardInterrupt):
        second.save_pretrained(directory)
    assert {p: p.read_bytes() for p in directory.iterdir()} == saved
    assert os.listdir(tmp_path) == ["adapter"]                                # no staging folder left either
    monkeypatch.undo()
    reloaded = LoraModel.from_pretrained(load_tiny_llama(), directory)
    torch.testing.assert_close(reloaded(input_ids=IDS).logits, first(input_ids=IDS).logits)


def _saved_adapter(tmp_path):
    trained(LoraModel(load_tiny_llama(), LoraConfig(**CONFIGS["list"]))).save_pretrained(tmp_path)
    return tmp_path


def _rewrite_weights(directory, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(directory / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "adapter_model.safetensors")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.pop(next(k for k in t if k.endswith("q_proj.lora_A.weight"))), r"missing \(1\):"),
    (lambda t: t.update({"base_model.model.extra.lora_A.weight": torch.zeros(1)}), r"unexpected \(1\):"),
    (lambda t: t.update({k: torch.zeros(5, 5) for k in [next(k for k in t if "v_proj.lora_B" in k)]}),
     r"mis-shaped \(1\): \[.*v_proj\.lora_B\.weight: file \(5, 5\), model \(32, 4\)"),
])
def test_a_bad_file_is_refused_and_changes_nothing(tmp_path, edit, message):
    directory = _saved_adapter(tmp_path)
    _rewrite_weights(directory, edit)
    model = load_tiny_llama()
    before = clone_state(model)
    classes = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=message):
        LoraModel.from_pretrained(model, directory)
    assert_same_state(before, clone_state(model))
    assert [type(m) for m in model.modules()] == classes

    wrapped = LoraModel(load_tiny_llama(), LoraConfig(r=2, target_modules=["o_proj"]))
    state = clone_state(wrapped)
    with pytest.raises(ValueError, match=message):
        wrapped.load_adapter(directory, adapter_name="bad")
    assert_same_state(state, clone_state(wrapped))
    assert list(wrapped.peft_config) == ["default"]


def test_a_corrupt_or_missing_file_is_named(tmp_path):
    directory = _saved_adapter(tmp_path)
    (directory / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"is not a readable safetensors file"):
        LoraModel.from_pretrained(load_tiny_llama(), directory)
    (directory / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no adapter_model\.safetensors in"):
        LoraModel.from_pretrained(load_tiny_llama(), directory)


def test_saved_config_is_what_peft_expects(tmp_path):
    directory = _saved_adapter(tmp_path)
    data = json.loads((directory / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["r"] == 4
    assert sorted(data["target_modules"]) == sorted(LLAMA_PROJECTIONS)
