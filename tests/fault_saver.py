"""A saver to be killed: `python fault_saver.py FOLDER`, driven line by line on stdin by tests/test_faults.py.

It imports torch once, builds two adapters of one shape (A: alpha 8, B: alpha 32, other weights:
a mix of the two loads silently unless the save is atomic), saves references `FOLDER.a` and
`FOLDER.b`, and A into FOLDER beside a user's README and sub-folder; it prints `ready SECONDS`
(the time one save takes). Each command then forks a child that saves, and the child is killed:

- `random DELAY FIRST EXCHANGE`: the child saves FIRST (`a`/`b`), then the other, in a loop;
  it is SIGKILLed after DELAY seconds.
- `step K FIRST EXCHANGE`: the child saves FIRST once and SIGKILLs itself just before its K-th
  file-system step (mkdir, write, fsync, link, rename, exchange, rmtree); prints `completed`
  when the save had fewer steps.

EXCHANGE 0 makes the swap use two renames instead of one `renameat2(RENAME_EXCHANGE)`.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time

import torch
from torch import nn

from qlora_inject import LoraConfig, LoraModel, atomic_files


class Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(256, 256)


def adapter(alpha: int, seed: int) -> LoraModel:
    torch.manual_seed(seed)
    return LoraModel(Holder(), LoraConfig(r=32, lora_alpha=alpha, target_modules=["proj"], init_lora_weights=False))


def kill_before_step(k: int) -> None:
    """Make the k-th file-system step of this process SIGKILL it instead."""
    count = [0]

    def counted(function):
        def step(*args, **kwargs):
            count[0] += 1
            if count[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return function(*args, **kwargs)
        return step

    for name in ("mkdir", "write", "fsync", "link", "rename", "replace"):
        setattr(os, name, counted(getattr(os, name)))
    shutil.rmtree = counted(shutil.rmtree)
    atomic_files._exchange = counted(atomic_files._exchange)


def main() -> None:
    torch.set_num_threads(1)                                                 # no OpenMP pool to inherit across fork
    folder = sys.argv[1]
    models = {"a": adapter(8, 1), "b": adapter(32, 2)}
    models["a"].save_pretrained(folder + ".a")
    models["b"].save_pretrained(folder + ".b")
    models["a"].save_pretrained(folder)
    with open(os.path.join(folder, "README.md"), "w") as handle:
        handle.write("the user's notes\n")
    os.mkdir(os.path.join(folder, "other"))
    with open(os.path.join(folder, "other", "adapter_config.json"), "w") as handle:
        handle.write('{"r": 2}\n')
    start = time.perf_counter()
    models["a"].save_pretrained(folder)
    print(f"ready {time.perf_counter() - start:.6f}", flush=True)
    for line in sys.stdin:
        kind, value, first, exchange = line.split()
        pid = os.fork()
        if pid == 0:                                                         # the child: save until killed
            if exchange == "0":
                atomic_files._exchange = lambda a, b: False
            order = [first, "b" if first == "a" else "a"]
            if kind == "step":
                kill_before_step(int(value))
                models[first].save_pretrained(folder)
                os._exit(0)
            while True:
                for name in order:
                    models[name].save_pretrained(folder)
        if kind == "random":
            time.sleep(float(value))
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        print("killed" if os.WIFSIGNALED(status) else "completed", flush=True)


if __name__ == "__main__":
    main()
