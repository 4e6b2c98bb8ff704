"""The command: the default training job, resume, PEFT-readable output, inspect, merge, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from qlora_inject import cli, train

from conftest import requires

pytestmark = [requires("transformers"), requires("bitsandbytes")]


def run(*argv: str) -> int:
    return cli.main(list(argv))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The default job, shortened: 16 steps, a checkpoint every 5."""
    output = tmp_path_factory.mktemp("train")
    assert run("train", "--steps", "16", "--save-every", "5", "--output", str(output), "--no-progress") == 0
    return output


def test_default_job_lowers_the_loss_and_writes_its_files(trained):
    losses = json.loads((trained / "losses.json").read_text())
    assert len(losses) == 16 and losses[-1] < losses[0]
    for name in ("adapter_model.safetensors", "adapter_config.json", "loss_curve.png",
                 "checkpoint/trainer_state.json", "checkpoint/trainer_state.safetensors"):
        assert (trained / name).is_file(), name
    assert not [p for p in trained.iterdir() if p.name.startswith(".checkpoint")]     # no staging left over


@requires("peft")
def test_the_saved_adapter_loads_in_peft_with_identical_outputs(trained, tmp_path):
    import peft

    from qlora_inject import LoraModel

    def base():
        return train.load_model(train.build_default_model(tmp_path / "m"), "nf4")

    ids = torch.randint(0, 256, (2, 16))
    ours = LoraModel.from_pretrained(base(), trained)
    theirs = peft.PeftModel.from_pretrained(base(), trained)
    for module in theirs.modules():                                           # as wrapped bases never repack
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
    real_write = train.write_checkpoint

    def write_then_die(output, model, optimizer, step, *rest):
        path = real_write(output, model, optimizer, step, *rest)
        if step == 5:
            raise KeyboardInterrupt("killed right after the step-5 checkpoint")
        return path

    monkeypatch.setattr(train, "write_checkpoint", write_then_die)
    options = train.TrainOptions(steps=9, save_every=5, output=tmp_path, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train.train(options, log=lambda _: None)
    first_five = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["losses"]
    monkeypatch.setattr(train, "write_checkpoint", real_write)
    assert run("train", "--steps", "9", "--save-every", "5", "--output", str(tmp_path), "--resume",
               "--no-progress") == 0
    losses = json.loads((tmp_path / "losses.json").read_text())
    assert len(losses) == 9 and losses[:5] == first_five


def test_training_with_fused_ops_follows_the_unfused_run(tmp_path):
    lines: list[str] = []
    fused = train.train(train.TrainOptions(steps=3, output=tmp_path / "fused", progress=False), log=lines.append)
    plain = train.train(train.TrainOptions(steps=3, output=tmp_path / "plain", progress=False, fuse=False),
                        log=lambda _: None)
    assert "fused 9 RMSNorm and 4 gated MLP modules" in lines
    assert fused.losses == pytest.approx(plain.losses, rel=1e-5)
    assert fused.losses[-1] < fused.losses[0]


def test_inspect_lists_modules_and_changes_nothing(capsys):
    assert run("inspect", "builtin", "--quant", "nf4", "--target-modules", "q_proj,v_proj") == 0
    out = capsys.readouterr().out
    assert "| model.layers.0.self_attn.q_proj | Linear4bit | bnb-4bit | 256 | 256 | yes |" in out
    assert "| model.layers.0.mlp.up_proj | Linear4bit | bnb-4bit | 256 | 1024 | no: not in target_modules |" in out
    assert "| lm_head | Linear | dense | 256 | 256 | no: not in target_modules |" in out
    assert "8 of 29 modules would be wrapped" in out


def test_merge_exports_a_dense_model_with_the_adapted_outputs(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    from qlora_inject import LoraModel

    out = tmp_path / "merged"
    assert run("merge", "builtin", str(trained), str(out), "--dequantize") == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    adapted = LoraModel.from_pretrained(train.load_model(train.build_default_model(tmp_path / "m"), "nf4"), trained)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--model", "/no/such/model"], r"--model '/no/such/model' does not exist"),
    (["train", "--quant", "int3"], r"argument --quant: invalid choice: 'int3'"),
    (["train", "--target-modules", "q_porj", "--steps", "1"], r"'q_porj' matches no module.*did you mean \['q_proj'"),
    (["train", "--steps", "0"], r"--steps 0 must be at least 1"),
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
