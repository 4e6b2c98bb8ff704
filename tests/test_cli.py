"""The command: the default training job, resume, PEFT-readable output, inspect, merge, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from qlora_inject import cli, pretrained, train
from qlora_inject.backends.bnb import never_repack

from conftest import requires

pytestmark = [requires("transformers"), requires("bitsandbytes")]


def run(*argv: str) -> int:
    return cli.main(list(argv))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny model's job, shortened: 16 steps, a checkpoint every 5."""
    output = tmp_path_factory.mktemp("train")
    assert run("train", "--model", "tiny", "--steps", "16", "--save-every", "5", "--output", str(output),
               "--no-progress") == 0
    return output


def test_tiny_job_lowers_the_loss_and_writes_its_files(trained):
    losses = json.loads((trained / "losses.json").read_text())
    assert len(losses) == 16 and losses[-1] < losses[0]
    for name in ("adapter_model.safetensors", "adapter_config.json", "loss_curve.png",
                 "checkpoint/trainer_state.json", "checkpoint/trainer_state.safetensors"):
        assert (trained / name).is_file(), name
    assert not [p for p in trained.iterdir() if p.name.startswith(".checkpoint")]     # no staging left over
    config = json.loads((trained / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny"                         # as `merge tiny` takes it


@requires("peft")
def test_the_saved_adapter_loads_in_peft_with_identical_outputs(trained, tmp_path):
    import peft

    from qlora_inject import LoraModel

    def base():
        return pretrained.load_model(train.build_default_model(tmp_path / "m"), "nf4")

    ids = torch.randint(0, 256, (2, 16))
    ours = LoraModel.from_pretrained(base(), trained)
    theirs = never_repack(peft.PeftModel.from_pretrained(base(), trained))   # as wrapped bases never repack
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


def test_training_with_fused_ops_follows_the_unfused_run(tmp_path):
    lines: list[str] = []
    fused = train.train(train.TrainOptions(model="tiny", steps=3, output=tmp_path / "fused", progress=False),
                        log=lines.append)
    plain = train.train(train.TrainOptions(model="tiny", steps=3, output=tmp_path / "plain", progress=False,
                                           fuse=False), log=lambda _: None)
    assert "fused 9 RMSNorm and 4 gated MLP modules" in lines
    assert fused.losses == pytest.approx(plain.losses, rel=1e-5)
    assert fused.losses[-1] < fused.losses[0]


def test_inspect_lists_modules_and_changes_nothing(capsys):
    assert run("inspect", "builtin", "--quant", "nf4", "--target-modules", "q_proj,v_proj") == 0
    out = capsys.readouterr().out
    assert "| model.layers.0.self_attn.q_proj | Linear4bit | nf4 | bnb-4bit | 256 | 256 | yes |" in out
    skipped = "no: not in target_modules"
    assert f"| model.layers.0.mlp.up_proj | Linear4bit | nf4 | bnb-4bit | 256 | 1024 | {skipped} |" in out
    assert f"| lm_head | Linear | none | dense | 256 | 256 | {skipped} |" in out
    assert "8 of 29 modules would be wrapped" in out


def test_merge_exports_a_dense_model_with_the_adapted_outputs(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    from qlora_inject import LoraModel

    out = tmp_path / "merged"
    assert run("merge", "tiny", str(trained), str(out), "--dequantize") == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = pretrained.load_model(train.build_default_model(tmp_path / "m"), "nf4")
    adapted = LoraModel.from_pretrained(base, trained)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--model", "/no/such/model"], r"--model '/no/such/model' does not exist"),
    (["train", "--quant", "int3"], r"argument --quant: invalid choice: 'int3'"),
    (["train", "--model", "tiny", "--target-modules", "q_porj", "--steps", "1"],
     r"'q_porj' matches no module.*did you mean \['q_proj'"),
    (["train", "--steps", "0"], r"--steps 0 must be at least 1"),
    (["train", "--alpha", "nan"], r"--alpha nan must be a finite number, e.g. 32"),
    (["train", "--alpha=-inf"], r"--alpha -inf must be a finite number"),
    (["train", "--seed", str(2**64)], r"--seed 18446744073709551616 must be between 0 and 2\*\*64 - 1"),
    (["inspect", "/nowhere"], r"model '/nowhere' does not exist"),
])
def test_bad_arguments_give_one_line_and_a_non_zero_exit(argv, message, capsys):
    try:
        status = run(*argv)
    except SystemExit as exit_:                                               # argparse's own usage errors
        status = exit_.code
    error = capsys.readouterr().err.strip()
    assert status == 2
    assert len(error.splitlines()) == 1 and "Traceback" not in error, error
    assert __import__("re").search(message, error), error


def test_a_data_file_that_is_not_text_is_refused(tmp_path, capsys):
    binary = tmp_path / "data.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    assert run("train", "--data", str(binary), "--steps", "1", "--output", str(tmp_path / "o")) == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith("is not UTF-8 text; give a text or JSONL file") and len(error.splitlines()) == 1
    bad_jsonl = tmp_path / "data.jsonl"
    bad_jsonl.write_text('{"text": "fine"}\n{"prompt": "no text field"}\n')
    assert run("train", "--data", str(bad_jsonl), "--steps", "1", "--output", str(tmp_path / "o")) == 2
    assert 'line 2 has no string "text" field' in capsys.readouterr().err


def test_merge_copies_the_base_tokenizer_and_gets_the_umask(tmp_path):
    import stat

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from qlora_inject import LoraConfig, LoraModel

    base = train.build_default_model(tmp_path / "base", hidden=64, layers=1)
    words = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(base)
    LoraModel(pretrained.load_model(base, "none"), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "adapter")
    previous = __import__("os").umask(0o022)
    try:
        assert run("merge", str(base), str(tmp_path / "adapter"), str(tmp_path / "out"), "--quant", "none") == 0
    finally:
        __import__("os").umask(previous)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert AutoTokenizer.from_pretrained(tmp_path / "out")("hello world")["input_ids"] == [1, 2]


def test_merge_with_a_config_that_is_not_an_object_is_one_line(trained, tmp_path, capsys):
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(trained, adapter, ignore=shutil.ignore_patterns("checkpoint"))
    (adapter / "adapter_config.json").write_text("[1]")
    assert run("merge", "builtin", str(adapter), str(tmp_path / "out")) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "adapter_config.json" in error, error
    assert not (tmp_path / "out").exists()
