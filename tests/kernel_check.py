"""Running a Triton kernel check script in a fresh process: under the interpreter on the CPU, compiled on CUDA."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest


def run_kernel_check(script: str, device: str = "cpu") -> None:
    """Run `script` in a fresh process, which must print "ok"; skips, naming the package, where one is missing."""
    needed = ["triton"] + [p for p in ("bitsandbytes", "hqq") if f"import {p}" in script or f"from {p}" in script]
    missing = [p for p in needed if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    env = dict(os.environ, QLORA_INJECT_KERNEL_DEVICE=device)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"                                       # read when triton.jit decorates
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd="/")
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
