"""Faults around `qlora-inject train`: crafted and damaged checkpoints, debris of killed writes, file
modes, resumes with other settings, exact resume, seeds, and non-finite losses."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import stat

import pytest
import torch

from qlora_inject import cli, train
from qlora_inject.checkpoint import CHECKPOINT, STATE_JSON, STATE_TENSORS, write_checkpoint

from conftest import requires
from factories import Holder, make_dense

pytestmark = [requires("transformers"), requires("bitsandbytes")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The built-in model's architecture, cut down: one layer, width 64 (byte vocabulary)."""
    return train.build_default_model(tmp_path_factory.mktemp("model") / "m", hidden=64, layers=1)


def small(output, model_dir, **changes) -> train.TrainOptions:
    """A training job of a few seconds on `model_dir` in NF4 (LoRA dropout 0.05, as every job)."""
    settings = dict(model=model_dir, output=output, steps=2, save_every=1, batch_size=2, seq_len=32, progress=False)
    return train.TrainOptions(**(settings | changes))


def quiet(_: str) -> None:
    pass


def run_cli(*argv: str, capsys) -> tuple[int, str]:
    status = cli.main(list(argv))
    error = capsys.readouterr().err.strip()
    assert "Traceback" not in error and len(error.splitlines()) <= 1, error
    return status, error


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory, model_dir):
    """A finished two-step run (checkpoint at step 2); copy it before changing anything."""
    output = tmp_path_factory.mktemp("two-steps")
    train.train(small(output, model_dir), log=quiet)
    return output


@pytest.fixture
def run_copy(two_steps, tmp_path):
    output = tmp_path / "run"
    shutil.copytree(two_steps, output)
    return output


class MakesMarker:
    """Unpickling this creates a file: what a crafted checkpoint would do with a real payload."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --- 1: nothing is unpickled -----------------------------------------------------------------------

@pytest.mark.parametrize(("target", "message"), [
    ("trainer_state.pt", r"old format \(trainer_state\.pt, a pickle file, which is never read"),
    (STATE_JSON, r"trainer_state\.json is damaged: not UTF-8 JSON"),
    (STATE_TENSORS, r"trainer_state\.safetensors is missing or damaged"),
])
def test_resume_never_unpickles_a_crafted_state_file(run_copy, model_dir, tmp_path, target, message, capsys):
    marker = tmp_path / "pwned"
    checkpoint = run_copy / CHECKPOINT
    if target == "trainer_state.pt":                          # a checkpoint in the old format
        (checkpoint / STATE_JSON).unlink()
        (checkpoint / STATE_TENSORS).unlink()
        torch.save({"step": 2, "losses": [1.0, 1.0], "optimizer": MakesMarker(marker)}, checkpoint / target)
    else:
        (checkpoint / target).write_bytes(pickle.dumps({"step": 2, "payload": MakesMarker(marker)}))
    status, error = run_cli("train", "--resume", "--steps", "3", "--save-every", "1", "--batch-size", "2",
                            "--seq-len", "32", "--output", str(run_copy), "--no-progress", "--model", str(model_dir),
                            capsys=capsys)
    assert not marker.exists()
    assert status == 2 and re.search(message, error), error


@pytest.mark.parametrize("damage", ["truncated json", "truncated tensors", "json list", "losses short",
                                    "rng garbage", "config [1]"])
def test_a_damaged_checkpoint_is_one_line_and_exit_2(run_copy, model_dir, damage, capsys):
    checkpoint = run_copy / CHECKPOINT
    if damage == "truncated json":
        text = (checkpoint / STATE_JSON).read_bytes()
        (checkpoint / STATE_JSON).write_bytes(text[:len(text) // 2])
    elif damage == "truncated tensors":
        data = (checkpoint / STATE_TENSORS).read_bytes()
        (checkpoint / STATE_TENSORS).write_bytes(data[:len(data) // 2])
    elif damage == "json list":
        (checkpoint / STATE_JSON).write_text("[1]")
    elif damage == "rng garbage":
        from safetensors.torch import load_file, save_file

        tensors = load_file(checkpoint / STATE_TENSORS)
        save_file(tensors | {"rng.torch": torch.zeros_like(tensors["rng.torch"])}, checkpoint / STATE_TENSORS)
    elif damage == "losses short":
        document = json.loads((checkpoint / STATE_JSON).read_text())
        (checkpoint / STATE_JSON).write_text(json.dumps(document | {"losses": document["losses"][:1]}))
    else:
        (checkpoint / "adapter_config.json").write_text("[1]")
    status, error = run_cli("train", "--resume", "--steps", "3", "--save-every", "1", "--batch-size", "2",
                            "--seq-len", "32", "--output", str(run_copy), "--no-progress", "--model", str(model_dir),
                            capsys=capsys)
    assert status == 2 and str(checkpoint) in error, error


# --- 3, 4: debris of killed writes, file modes -------------------------------------------------------

def tiny_lora():
    from qlora_inject import LoraConfig, LoraModel

    model = LoraModel(Holder(make_dense()), LoraConfig(r=2, target_modules=["proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.randn(3, make_dense().in_features)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_the_next_checkpoint_write_removes_debris_of_killed_writes_and_only_that(tmp_path):
    model, optimizer = tiny_lora()
    debris = [tmp_path / ".checkpoint-50-k3_xq9ab", tmp_path / ".checkpoint.999999999-0123abcd.tmp",
              tmp_path / ".checkpoint-old"]                    # older versions' names, and a dead writer's
    kept = [tmp_path / ".checkpoint-notes", tmp_path / "checkpoint-50-mine", tmp_path / ".checkpoint-7-short"]
    for folder in debris + kept:
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"\0" * 1000)
    write_checkpoint(tmp_path, model, optimizer, 1, [1.0], torch.Generator())
    assert [p.name for p in debris if p.exists()] == []
    assert [p.name for p in kept if not p.exists()] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CHECKPOINT] + [p.name for p in kept])


def test_checkpoint_folders_and_files_get_the_umask(tmp_path):
    model, optimizer = tiny_lora()
    previous = os.umask(0o022)
    try:
        folder = write_checkpoint(tmp_path, model, optimizer, 1, [1.0], torch.Generator())
    finally:
        os.umask(previous)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {
        name: 0o644 for name in ("adapter_model.safetensors", "adapter_config.json", STATE_JSON, STATE_TENSORS)}


def keep_writing_checkpoints(output, ready) -> None:
    """In a forked child: write checkpoints of step 1, 2, ... until killed; the step is in every weight."""
    torch.set_num_threads(1)
    model, optimizer = tiny_lora()
    trainable = [p for p in model.parameters() if p.requires_grad]
    ready.set()
    for step in range(1, 10**6):
        with torch.no_grad():
            for p in trainable:
                p.fill_(step)
        write_checkpoint(output, model, optimizer, step, [0.0] * step, torch.Generator())


def test_a_checkpoint_write_killed_at_any_moment_leaves_one_whole_checkpoint(tmp_path):
    import multiprocessing
    import random
    import signal
    import time

    from qlora_inject.adapter_io import read_adapter
    from qlora_inject.checkpoint import latest_checkpoint, read_trainer_state

    fork = multiprocessing.get_context("fork")           # the child starts in milliseconds, modules imported
    model, optimizer = tiny_lora()
    rng, output, whole = random.Random(0), tmp_path / "run", 0
    for trial in range(12):
        ready = fork.Event()
        child = fork.Process(target=keep_writing_checkpoints, args=(output, ready), daemon=True)
        child.start()
        assert ready.wait(timeout=30), "the writer did not start"
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(child.pid, signal.SIGKILL)
        child.join(timeout=30)
        folder = latest_checkpoint(output)
        if folder is None:                                # killed before its first write ended
            continue
        state = read_trainer_state(folder)
        _, tensors = read_adapter(folder)
        assert state.step >= 1 and all(bool((t == state.step).all()) for t in tensors.values()), trial
        whole += 1
        write_checkpoint(output, model, optimizer, 1, [1.0], torch.Generator())    # removes the debris
        assert [p.name for p in output.iterdir()] == [CHECKPOINT]
        shutil.rmtree(output)
    assert whole >= 6


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_no_debris(tmp_path, monkeypatch):
    import errno

    import qlora_inject.adapter_io
    from qlora_inject.checkpoint import latest_checkpoint, read_trainer_state

    model, optimizer = tiny_lora()
    write_checkpoint(tmp_path, model, optimizer, 1, [1.0], torch.Generator())
    real_write_file = qlora_inject.adapter_io.write_file

    def disk_full_at_state(path, data, *rest):
        if path.name == STATE_TENSORS:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write_file(path, data, *rest)

    monkeypatch.setattr(qlora_inject.adapter_io, "write_file", disk_full_at_state)
    with pytest.raises(OSError, match="No space left on device"):
        write_checkpoint(tmp_path, model, optimizer, 2, [1.0, 0.5], torch.Generator())
    assert read_trainer_state(latest_checkpoint(tmp_path)).step == 1
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT]


# --- 7: a resume continues the checkpoint's run, or is refused ----------------------------------------

def test_a_resume_with_other_settings_is_refused_naming_each(run_copy, model_dir):
    before = (run_copy / CHECKPOINT / STATE_JSON).read_bytes()
    with pytest.raises(train.UsageError, match=r"--r 8 \(checkpoint: --r 16\); --alpha 16\.0 \(checkpoint: "
                                               r"--alpha 32\.0\); --target-modules 'q_proj' .*--lr 0\.1 .*"
                                               r"--batch-size 3 .*--seed 1 \(checkpoint: --seed 0\)"):
        train.train(small(run_copy, model_dir, resume=True, steps=3, r=8, alpha=16, target_modules="q_proj", lr=0.1,
                          batch_size=3, seed=1), log=quiet)
    with pytest.raises(train.UsageError, match=r"--steps 1 is below the checkpoint's step 2; give --steps 2 or more"):
        train.train(small(run_copy, model_dir, resume=True, steps=1), log=quiet)
    assert (run_copy / CHECKPOINT / STATE_JSON).read_bytes() == before          # nothing rewritten


def test_a_resume_with_more_steps_continues_and_keeps_history(run_copy, model_dir):
    first = json.loads((run_copy / CHECKPOINT / STATE_JSON).read_text())["losses"]
    result = train.train(small(run_copy, model_dir, resume=True, steps=3), log=quiet)
    state = json.loads((run_copy / CHECKPOINT / STATE_JSON).read_text())
    assert result.start_step == 2 and len(result.losses) == 3 and result.losses[:2] == first
    assert state["step"] == 3 and state["losses"] == result.losses


# --- 8: exact resume, deterministic seeds ------------------------------------------------------------

def test_a_resumed_run_reproduces_the_uninterrupted_one_exactly(tmp_path, model_dir, monkeypatch):
    whole = train.train(small(tmp_path / "whole", model_dir, steps=6, save_every=3), log=quiet)
    real_write = train.write_checkpoint

    def write_then_die(output, model, optimizer, step, *rest):
        path = real_write(output, model, optimizer, step, *rest)
        if step == 3:
            raise KeyboardInterrupt("killed right after the step-3 checkpoint")
        return path

    monkeypatch.setattr(train, "write_checkpoint", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.train(small(tmp_path / "cut", model_dir, steps=6, save_every=3), log=quiet)
    monkeypatch.setattr(train, "write_checkpoint", real_write)
    torch.rand(100)                                                  # the resuming process's RNG is elsewhere
    assert cli.main(["train", "--model", str(model_dir), "--steps", "6", "--save-every", "3", "--batch-size", "2",
                     "--seq-len", "32", "--output", str(tmp_path / "cut"), "--resume", "--no-progress"]) == 0
    resumed = json.loads((tmp_path / "cut" / "losses.json").read_text())
    assert resumed == whole.losses                                   # floats, compared exactly
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "whole" / "adapter_model.safetensors"), load_file(tmp_path / "cut" /
                                                                                    "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_same_seed_gives_the_same_run_on_a_model_folder(tmp_path, model_dir):
    runs = [train.train(small(tmp_path / f"run{i}", model_dir, quant="none", steps=3, seed=seed), log=quiet)
            for i, seed in enumerate((5, 5, 6))]
    assert runs[0].losses == runs[1].losses and runs[0].losses != runs[2].losses
    config = json.loads((tmp_path / "run0" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(model_dir)


# --- 9: non-finite losses ------------------------------------------------------------------------------

def test_a_non_finite_loss_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, model_dir,
                                                                                      monkeypatch, capsys):
    import qlora_inject.loss

    real_loss, calls = qlora_inject.loss.causal_lm_loss, []

    def nan_at_step_5(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(qlora_inject.loss, "causal_lm_loss", nan_at_step_5)
    status, error = run_cli("train", "--steps", "6", "--save-every", "2", "--batch-size", "2", "--seq-len", "32",
                            "--output", str(tmp_path), "--no-progress", "--model", str(model_dir), capsys=capsys)
    assert status == 1 and len(calls) == 5
    assert re.search(r"training stopped: the loss of step 5 is nan; .*last good checkpoint \(step 4\)", error), error
    state = json.loads((tmp_path / CHECKPOINT / STATE_JSON).read_text())
    assert state["step"] == 4 and len(state["losses"]) == 4 and all(map(__import__("math").isfinite, state["losses"]))
    assert not (tmp_path / "adapter_model.safetensors").exists()      # no NaN adapter saved
