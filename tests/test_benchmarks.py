"""The benchmark scripts run end to end on tiny shapes (on the CPU here) and write their tables.

Timings are not asserted (a timed test would flake); what is checked is that every workload row
is produced, with numbers, and that the files land where asked.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import requires

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table_rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| format")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if "---" not in line]


def test_kernel_sweep_covers_every_format_shape_and_token_count(tmp_path, capsys):
    _script("bench_kernels").main(["--device", "cpu", "--shapes", "128x128,64x256", "--tokens", "1,8",
                                   "--dtype", "fp32", "--repeat", "1", "--output", str(tmp_path)])
    rows = [r for r in _table_rows((tmp_path / "kernels.md").read_text()) if r[0] != "out x in"]
    assert len(rows) == 2 * 2 * 5
    assert {r[2] for r in rows} == {"dense", "nf4", "gptq", "awq", "hqq"}
    for row in rows:
        assert float(row[4]) > 0 and float(row[5]) > 0
        assert row[8] == "—" if row[2] == "dense" else re.fullmatch(r"\d+%", row[8])
    assert "machine:" in capsys.readouterr().out
    assert (tmp_path / "kernels.png").stat().st_size > 1000


def test_fused_ops_benchmark_times_both_and_counts_what_each_keeps(tmp_path, capsys):
    _script("bench_fused_ops").main(["--device", "cpu", "--tokens", "8", "--hidden", "32", "--intermediate", "48",
                                     "--dtype", "bf16,fp32", "--repeat", "1", "--output", str(tmp_path)])
    rows = [r for r in _table_rows((tmp_path / "fused_ops.md").read_text()) if r[0] != "op"]
    assert [(r[0], r[1]) for r in rows] == [("RMSNorm", "bf16"), ("SwiGLU", "bf16"), ("RMSNorm", "fp32"),
                                            ("SwiGLU", "fp32")]
    for op, dtype, eager_ms, fused_ms, ratio, eager_kept, fused_kept in rows:
        assert float(eager_ms) > 0 and float(fused_ms) > 0 and float(ratio) > 0
        assert float(fused_kept) <= float(eager_kept), (op, dtype)
    assert "machine:" in capsys.readouterr().out
    assert (tmp_path / "fused_ops.png").stat().st_size > 1000


@requires("bitsandbytes")
@requires("peft")
def test_gpu_check_script_runs_its_steps_in_smoke_mode(tmp_path):
    """`gpu_check.sh --smoke`: the same steps as on a GPU (CUDA tests, kernel sweep, model step of ours
    vs PEFT with gradient checkpointing), at tiny shapes on the CPU, from a copy of the package."""
    env = {**os.environ, "PYTHON": sys.executable, "QLORA_INJECT_SITE": str(tmp_path / "site")}
    result = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), "--smoke", str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    out = tmp_path / "out"
    assert {"cuda_tests.log", "kernels.log", "model_step.log", "kernels.md", "model_step.md", "fused_ops.md"} <= {
        p.name for p in out.iterdir()}
    assert "skipped" in (out / "cuda_tests.log").read_text()                  # no GPU here: skipped, with reasons
    (row,) = _table_rows((out / "model_step.md").read_text())
    assert row[:2] == ["nf4", "bf16"]                  # ours, dense-LoRA (the tax) and PEFT tokens/s, ours/dense-LoRA
    assert all(float(row[column].replace(",", "")) > 0 for column in (2, 3, 4, 5))
    assert (tmp_path / "site" / "qlora_inject" / "kernels" / "fused_lora.py").is_file()   # laid out as installed


def test_the_gpu_preset_is_the_8b_shape():
    module = _script("bench_model_step")
    preset = module.PRESETS["llama-8b"]
    assert (preset["hidden"], preset["intermediate"], preset["vocab"], preset["seq"]) == (4096, 14336, 128256, 2048)
    with pytest.raises(SystemExit):
        module.main(["--preset", "no-such-preset"])


@requires("bitsandbytes")
@requires("peft")
@pytest.mark.parametrize("dora, dropout", [(False, 0.0), (True, 0.0), (False, 0.05)],
                         ids=["lora", "dora", "dropout"])
def test_layer_benchmark_measures_ours_peft_and_dense(tmp_path, dora, dropout):
    from qlora_inject.bench import LayerWorkload, layer_report, run_layer_benchmark, save_layer_results

    workload = LayerWorkload(in_features=128, out_features=256, tokens=8, repeat=1, formats=("dense", "nf4"),
                             dora=dora, dropout=dropout)
    results = run_layer_benchmark(workload)
    assert [r.fmt for r in results] == ["dense", "nf4"]
    nf4 = results[1]
    assert nf4.ours_s > 0 and nf4.peft_s > 0 and nf4.dense_s > 0
    assert nf4.ours_saved <= nf4.peft_saved                                  # no dense weight kept for backward
    text = layer_report(workload, results)
    assert ("DoRA" in text) == dora and ("lora_dropout=0.05" in text) == bool(dropout)
    assert "writing the dense weight once" in text and "dequantization path kept for 4bit float32" in text
    assert len(_table_rows(text)) == 2
    save_layer_results(text, results, tmp_path, workload.name)
    name = "layer" + ("_dora" if dora else "") + ("_dropout" if dropout else "")
    assert (tmp_path / f"{name}.md").is_file() and (tmp_path / f"{name}.png").is_file()


def test_interleaved_steps_rotate_so_none_always_follows_the_same_one():
    from qlora_inject.bench import interleaved_medians

    order: list[str] = []
    steps = {name: (lambda name=name: order.append(name)) for name in ("ours", "dense", "peft")}
    medians = interleaved_medians(steps, repeat=6, warmup=0)
    assert set(medians) == set(steps) and all(value >= 0 for value in medians.values())
    followers = {(before, after) for before, after in zip(order, order[1:], strict=False)}
    assert ("peft", "ours") in followers and ("peft", "dense") in followers, order
    assert [order.count(name) for name in steps] == [6, 6, 6]
