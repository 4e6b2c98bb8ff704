"""Faults while adapter files are written or read: kills mid-save, a full disk, debris, bad files.

The guarantee under test: a folder a user saved into is the previous adapter or the new one,
never a mix, whatever moment the save dies at; nothing but adapter tensors is ever loaded.
"""

from __future__ import annotations

import errno
import json
import os
import random
import selectors
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora_inject import LoraConfig, LoraModel, atomic_files
from qlora_inject.adapter_io import CONFIG_NAME, WEIGHTS_NAME, read_adapter

from conftest import requires
from factories import Holder, load_tiny_llama, make_dense
from parity import assert_same_state, clone_state

SAVER = Path(__file__).with_name("fault_saver.py")
USER_FILES = {"README.md": "the user's notes\n", "other/adapter_config.json": '{"r": 2}\n'}


class Saver:
    """tests/fault_saver.py, started once; each command forks a saving child and kills it."""

    def __init__(self, folder: Path) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SAVER.parent), os.environ.get("PYTHONPATH", "")])}
        self.process = subprocess.Popen([sys.executable, str(SAVER), str(folder)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.process.stdout, selectors.EVENT_READ)
        self.save_seconds = float(self.answer(timeout=60).split()[1])

    def answer(self, timeout: float = 10) -> str:
        if not self.selector.select(timeout):
            raise TimeoutError(f"fault_saver.py gave no answer in {timeout} s")
        line = self.process.stdout.readline()
        assert line, f"fault_saver.py exited with {self.process.wait()}"
        return line.strip()

    def ask(self, *words: object) -> str:
        self.process.stdin.write(" ".join(map(str, words)) + "\n")
        self.process.stdin.flush()
        return self.answer()

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture(scope="module")
def saver(tmp_path_factory):
    """One saver for the module's kill tests (it takes seconds to import torch); its folder is `saver.folder`."""
    folder = tmp_path_factory.mktemp("kills") / "adapter"
    saver = Saver(folder)
    saver.folder = folder
    yield saver
    saver.close()


def which_adapter(folder: Path) -> str:
    """'a' or 'b': the reference the folder equals exactly (config and every tensor); fails on anything else."""
    config, tensors = read_adapter(folder)
    for name in "ab":
        ref_config, ref_tensors = read_adapter(f"{folder}.{name}")
        if config.to_dict() == ref_config.to_dict() and tensors.keys() == ref_tensors.keys() \
                and all(torch.equal(tensors[k], ref_tensors[k]) for k in tensors):
            return name
    raise AssertionError(f"{folder} is neither adapter A nor B: alpha {config.lora_alpha}, "
                         f"{sorted(os.listdir(folder))}")


def assert_user_files_kept(folder: Path) -> None:
    assert {name: (folder / name).read_text() for name in USER_FILES} == USER_FILES


def assert_no_debris(folder: Path) -> None:
    assert sorted(os.listdir(folder.parent)) == sorted([folder.name, f"{folder.name}.a", f"{folder.name}.b"])
    assert sorted(os.listdir(folder)) == sorted([CONFIG_NAME, WEIGHTS_NAME, "README.md", "other"])


@pytest.mark.parametrize("exchange", [1, 0], ids=["one-step-swap", "two-renames"])
def test_killed_at_random_moments_a_folder_is_a_or_b(saver, exchange):
    folder, rng, seen = saver.folder, random.Random(14), set()
    # Kills within 3 saves' time (measured at start); a loaded machine can slow saves past that, so
    # after 15 trials that have not yet seen both adapters, the window widens until they have (60 at most).
    window = 3 * saver.save_seconds
    for trial in range(60):
        if trial >= 15 and seen == {"a", "b"}:
            break
        if trial >= 15:
            window *= 1.5
        first = rng.choice("ab")
        assert saver.ask("random", f"{rng.uniform(0, window) + 0.002:.6f}", first, exchange) == "killed"
        seen.add(which_adapter(folder))                                      # loads as exactly A or B
        assert_user_files_kept(folder)
    assert seen == {"a", "b"}, f"every kill left {seen}: the kills did not land inside saves"
    assert saver.ask("step", 10**6, "b", exchange) == "completed"             # the next save removes the debris
    assert which_adapter(folder) == "b"
    assert_no_debris(folder)


@pytest.mark.parametrize("exchange", [1, 0], ids=["one-step-swap", "two-renames"])
def test_killed_before_each_step_of_a_save_a_folder_is_a_or_b(saver, exchange):
    folder, outcomes = saver.folder, []
    for step in range(1, 200):
        answer = saver.ask("step", step, "b" if which_adapter(folder) == "a" else "a", exchange)
        outcomes.append(which_adapter(folder))
        assert_user_files_kept(folder)
        if answer == "completed":
            break
    else:
        pytest.fail("a save took more than 200 steps")
    assert step > 8 and len(set(outcomes)) == 2, outcomes
    assert_no_debris(folder)


@pytest.mark.parametrize(("call", "budget"), [("write", 0), ("write", 1000), ("write", "weights"),
                                             ("fsync", 1), ("fsync", 2)],
                         ids=["write-at-once", "write-mid-weights", "write-at-config", "fsync-1st", "fsync-2nd"])
def test_a_full_disk_leaves_the_previous_adapter(tmp_path, monkeypatch, call, budget):
    """ENOSPC from a write (after what fits) or from the n-th fsync (where delayed allocation reports it)."""
    folder = tmp_path / "adapter"
    first = _dense_adapter(alpha=8)
    first.save_pretrained(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    left = [len(before[WEIGHTS_NAME]) if budget == "weights" else budget]
    write, fsync = os.write, os.fsync

    def write_until_full(fd: int, data) -> int:
        if len(data) > left[0]:                                              # writes what fits, then fails
            write(fd, bytes(data[:left[0]]))
            raise OSError(errno.ENOSPC, "No space left on device")
        left[0] -= len(data)
        return write(fd, data)

    def fsync_until_full(fd: int) -> None:
        left[0] -= 1
        if left[0] == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(fd)

    if call == "write":
        monkeypatch.setattr(os, "write", write_until_full)
    else:
        monkeypatch.setattr(os, "fsync", fsync_until_full)
    with pytest.raises(OSError, match="No space left"):
        _dense_adapter(alpha=32).save_pretrained(folder)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert os.listdir(tmp_path) == ["adapter"]
    loaded = LoraModel.from_pretrained(Holder(make_dense()), folder)
    assert_same_state(clone_state(first), clone_state(loaded))


def test_a_full_tmpfs_leaves_the_previous_adapter(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    first = _dense_adapter(alpha=8, r=32)                                  # weights over 6 pages
    first.save_pretrained(tmp_path / "probe")
    pages = sum(-(-p.stat().st_size // 4096) for p in (tmp_path / "probe").iterdir())
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={4096 * (pages + 2)}", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); test_a_full_disk_leaves_the_previous_adapter covers it")
    try:
        folder = mount / "adapter"
        first.save_pretrained(folder)
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
        with pytest.raises(OSError) as caught:
            _dense_adapter(alpha=32, r=32).save_pretrained(folder)
        assert caught.value.errno == errno.ENOSPC
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
        assert os.listdir(mount) == ["adapter"]
        loaded = LoraModel.from_pretrained(Holder(make_dense()), folder)
        assert_same_state(clone_state(first), clone_state(loaded))
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_stale_temp_files_of_dead_savers_are_removed_by_the_next_save(tmp_path):
    folder = tmp_path / "adapter"
    _dense_adapter(alpha=8).save_pretrained(folder)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()                          # a process id that has exited
    debris = [folder / ".adapter_model.safetensors.k2j4_x9a.tmp",           # earlier versions' mkstemp names
              folder / f".adapter_config.json.{dead}-0123abcd.tmp", tmp_path / f".adapter.{dead}-89abcdef.tmp",
              tmp_path / f".adapter.{dead}-fedcba98.old"]
    live = [folder / ".adapter_config.json.1-0123abcd.tmp", tmp_path / ".adapter.1-0123abcd.tmp"]  # pid 1 lives
    for path in debris + live:
        if path.suffix == ".tmp" and path.parent == folder:
            path.write_bytes(b"partial")
        else:
            path.mkdir()
            (path / WEIGHTS_NAME).write_bytes(b"partial")
    _dense_adapter(alpha=32).save_pretrained(folder)
    assert not [p for p in debris if p.exists()]
    assert all(p.exists() for p in live)                                     # a running save's files are left alone
    assert read_adapter(folder)[0].lora_alpha == 32


def test_a_folder_left_missing_between_two_renames_is_put_back_by_the_next_load(tmp_path):
    folder = tmp_path / "adapter"
    first = _dense_adapter(alpha=8)
    first.save_pretrained(folder)
    _dense_adapter(alpha=32).save_pretrained(tmp_path / "new")
    dead = "999999999"                                                       # above any pid_max: never alive
    folder.rename(tmp_path / f".adapter.{dead}-0123abcd.old")
    (tmp_path / "new").rename(tmp_path / f".adapter.{dead}-0123abcd.tmp")
    loaded = LoraModel.from_pretrained(Holder(make_dense()), folder)
    assert_same_state(clone_state(first), clone_state(loaded))
    assert os.listdir(tmp_path) == ["adapter"]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_saved_files_get_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        _dense_adapter(alpha=8).save_pretrained(tmp_path / "adapter")
        _dense_adapter(alpha=8).save_pretrained(tmp_path / "adapter")      # a replacing save too
    finally:
        os.umask(old)
    folder = tmp_path / "adapter"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o666 & ~umask, name


@pytest.mark.parametrize("swap", ["one-step", "two-renames", "in-place"])
def test_a_save_keeps_the_users_other_files(tmp_path, monkeypatch, swap):
    folder = tmp_path / "adapter"
    _dense_adapter(alpha=8).save_pretrained(folder)
    for name, text in {**USER_FILES, "tokenizer.json": "{}"}.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text(text)
    (folder / "latest").symlink_to("other")
    os.chmod(folder, 0o750)
    if swap == "two-renames":
        monkeypatch.setattr(atomic_files, "_exchange", lambda a, b: False)
    if swap == "in-place":
        monkeypatch.setattr(atomic_files, "_cannot_swap", lambda final: True)
    _dense_adapter(alpha=32).save_pretrained(folder)
    assert read_adapter(folder)[0].lora_alpha == 32
    assert_user_files_kept(folder)
    assert (folder / "tokenizer.json").read_text() == "{}" and os.readlink(folder / "latest") == "other"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750
    assert os.listdir(tmp_path) == ["adapter"]


@pytest.mark.parametrize("mount", ["tmpfs", "bind"])
def test_a_save_into_a_mount_point_replaces_the_files_in_it(tmp_path, mount):
    folder, source = tmp_path / "adapter", tmp_path / "source"
    folder.mkdir()
    source.mkdir()
    command = ["mount", "-t", "tmpfs", "tmpfs", str(folder)] if mount == "tmpfs" else \
        ["mount", "--bind", str(source), str(folder)]
    if subprocess.run(command, capture_output=True).returncode != 0:
        pytest.skip(f"cannot mount ({mount}) here: needs root")
    try:
        _dense_adapter(alpha=8).save_pretrained(folder)
        (folder / "README.md").write_text("kept\n")
        _dense_adapter(alpha=32).save_pretrained(folder)                     # the folder itself cannot be renamed
        assert read_adapter(folder)[0].lora_alpha == 32 and (folder / "README.md").read_text() == "kept\n"
        assert sorted(os.listdir(folder)) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]
        assert sorted(os.listdir(tmp_path)) == ["adapter", "source"]
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_save_into_the_working_directory_leaves_it_usable(tmp_path, monkeypatch):
    (tmp_path / "adapter").mkdir()
    monkeypatch.chdir(tmp_path / "adapter")
    _dense_adapter(alpha=8).save_pretrained(".")
    _dense_adapter(alpha=32).save_pretrained(".")
    assert read_adapter(".")[0].lora_alpha == 32 and os.path.samefile(".", tmp_path / "adapter")


def test_a_save_into_a_symlinked_folder_keeps_the_link(tmp_path):
    _dense_adapter(alpha=8).save_pretrained(tmp_path / "real")
    (tmp_path / "link").symlink_to("real")
    _dense_adapter(alpha=32).save_pretrained(tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and read_adapter(tmp_path / "real")[0].lora_alpha == 32


@requires("transformers")
@requires("bitsandbytes")
@pytest.mark.parametrize("key", ["model.embed_tokens.weight", "lm_head.weight",
                                 "model.layers.0.self_attn.k_proj.weight",          # packed 4-bit, not wrapped
                                 "model.layers.0.self_attn.q_proj.base_layer.weight"])   # packed 4-bit, wrapped
def test_base_weights_in_an_adapter_file_are_refused(tmp_path, key):
    from safetensors.torch import load_file, save_file

    LoraModel(load_tiny_llama("nf4"), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    model = load_tiny_llama("nf4")
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    base = dict(model.state_dict())
    base["model.layers.0.self_attn.q_proj.base_layer.weight"] = base.pop("model.layers.0.self_attn.q_proj.weight")
    tensors["base_model.model." + key] = torch.ones(base[key].shape, dtype=base[key].dtype)   # fits: it would be copied
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    before = clone_state(model)
    with pytest.raises(ValueError, match=rf"unexpected \(1\): \['{key}'\]"):
        LoraModel.from_pretrained(model, tmp_path)
    assert_same_state(before, clone_state(model))


def test_integer_adapter_tensors_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    _dense_adapter(alpha=8).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    tensors["base_model.model.proj.lora_A.weight"] = tensors["base_model.model.proj.lora_A.weight"].to(torch.int64)
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=r"not floating-point \(1\): \['proj\.lora_A\.weight: file torch\.int64"):
        LoraModel.from_pretrained(Holder(make_dense()), tmp_path)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_biases_the_config_trains_still_load(tmp_path, bias):
    saved = _dense_adapter(alpha=8, bias=bias)
    with torch.no_grad():
        saved.model.proj.base_layer.bias.add_(1.0)
    saved.save_pretrained(tmp_path)
    loaded = LoraModel.from_pretrained(Holder(make_dense()), tmp_path)
    assert torch.equal(loaded.model.proj.base_layer.bias, saved.model.proj.base_layer.bias)


@pytest.mark.parametrize(("content", "message"), [
    (b"", r"adapter_config\.json is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\xff", r"adapter_config\.json is not text \(byte \d+ is not UTF-8"),
    (b'{"r": 4,', r"adapter_config\.json is not valid JSON \(Expecting .* at line 1, column \d+\)"),
    (b"[1, 2, 3]", r"adapter_config\.json holds a JSON array \('\[1, 2, 3\]'\), not an object"),
    (b"null", r"adapter_config\.json holds a JSON null \('null'\), not an object"),
    (b'{"r": 0}', r"adapter_config\.json: r=0 must be a positive integer"),
])
def test_a_bad_adapter_config_is_named_and_changes_nothing(tmp_path, content, message):
    _dense_adapter(alpha=8).save_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_bytes(content)
    model = Holder(make_dense())
    before = clone_state(model)
    with pytest.raises(ValueError, match=message):
        LoraModel.from_pretrained(model, tmp_path)
    assert_same_state(before, clone_state(model))
    with pytest.raises(ValueError, match=r"must be a dict of LoraConfig fields"):
        LoraConfig.from_dict(json.loads(b"[1]"))


def test_saving_with_no_adapter_left_says_so_and_writes_nothing(tmp_path):
    model = _dense_adapter(alpha=8)
    model.delete_adapter("default")
    with pytest.raises(ValueError, match=r"no adapter to save into .*: every adapter was deleted"):
        model.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def _dense_adapter(alpha: int, bias: str = "none", r: int = 4) -> LoraModel:
    return LoraModel(Holder(make_dense()), LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"],
                                                       init_lora_weights=False, bias=bias))

