"""Which format should I fine-tune in? The default job in every format, measured the same way.

For each format (dense, NF4, FP4, int8, HQQ, GPTQ, AWQ) the default job runs as `qlora-inject train`
runs it (`train.train`: SmolLM2-135M-Instruct on the date task, the same seed, steps and settings),
and on the same 48 held-out dates:

    base          answer loss and exact match of the quantized model before training (what quantization cost)
    tuned         the same with the LoRA adapter (what the fine-tune reached in this format)
    merged        the adapter merged into the format (`merge_adapter`: requantize(dequantize(W) + s·BA))
    merged dense  the adapter merged into a dense copy (`merge_and_unload(dequantize=True)`)

with the training speed (tokens/s of the padded batches, as `train` reports it), the peak resident
memory of loading, quantizing and fine-tuning above the process's memory before (Linux VmHWM, reset
through /proc/self/clear_refs), and the adapter file's size. The merged models are scored after the
saved adapter is loaded onto a freshly quantized base. `run_quality` runs each format in a process of
its own (`python -m qlora_inject.quality FORMAT`), so one format's memory is not counted in another's.

GPTQ and AWQ here are round-to-nearest (per-group min-max, no calibration data) packed by their
own libraries; HQQ uses its own data-free optimizer; bitsandbytes quantizes as it always does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


def quality_formats() -> tuple[str, ...]:
    """Every format users can name (`registry.quant_names()`), dense (`none`) first."""
    from qlora_inject.registry import quantized_names

    return ("none", *quantized_names())


def quantizer(quant: str, group_size: int) -> str:
    """How format `quant` was made here, in a few words (the table's second column): its backend says."""
    from qlora_inject.registry import format_for

    return format_for(quant).quantizer_summary(quant, group_size)


@dataclass(frozen=True)
class QualityWorkload:
    """What `run_quality` runs: the default job (`TrainOptions()` but for these fields) in each format."""

    formats: tuple[str, ...] = field(default_factory=quality_formats)
    steps: int = 30                                    # the default job's
    seed: int = 0
    own_process: bool = True                           # each format in a fresh process (its own peak memory)
    threads: int | None = None                         # torch's intra-op threads (None: torch's default)
    parallel: int = 1                                  # formats run at once (own processes; they share the CPU)


@dataclass(frozen=True)
class QualityResult:
    """One format's row. Losses are mean answer-token losses on the held-out dates; matches, exact match."""

    quant: str
    quantizer: str
    base_loss: float
    base_match: float
    tuned_loss: float
    tuned_match: float
    merged_loss: float
    merged_match: float
    dense_merged_loss: float
    dense_merged_match: float
    reloaded_loss: float                               # the saved adapter on a fresh base: tuned_loss again
    tokens_per_second: float
    peak_rss_mib: float | None                         # None where Linux does not let the peak be reset
    adapter_mib: float
    train_seconds: float

    @property
    def kept(self) -> float:
        """The share of the fine-tune's held-out loss gain the merge into the format keeps."""
        from qlora_inject.merge_report import MergeGain

        return MergeGain(self.base_loss, self.tuned_loss, self.merged_loss).kept


def measure_format(quant: str, workload: QualityWorkload = QualityWorkload(),
                   log: Callable[[str], None] = print) -> QualityResult:
    """Run the default job in format `quant` in this process, then score its merges (see the module doc)."""
    from qlora_inject import train

    source = train.model_source(None)
    threads = torch.get_num_threads()
    torch.set_num_threads(workload.threads or threads)
    try:
        return _measure_format(quant, workload, log, source)
    finally:
        torch.set_num_threads(threads)


def _measure_format(quant: str, workload: QualityWorkload, log: Callable[[str], None], source: Path) -> QualityResult:
    from qlora_inject import date_task, train
    from qlora_inject.model import LoraModel
    from qlora_inject.pretrained import load_model
    from qlora_inject.quantize import default_group_size

    with tempfile.TemporaryDirectory(prefix="qlora-inject-quality-") as tmp:
        options = train.TrainOptions(quant=quant, steps=workload.steps, seed=workload.seed, output=Path(tmp),
                                     save_every=workload.steps + 1, progress=False)
        peak = PeakMemory()
        began = time.perf_counter()
        result = train.train(options, log=lambda line: log(f"[{quant}] {line}"))
        seconds, peak_mib = time.perf_counter() - began, peak.mib()
        adapter_mib = (Path(tmp) / "adapter_model.safetensors").stat().st_size / 2**20
        task = train.DateTask(source, options.batch_size)  # the run's held-out dates, as train made them

        def score(model) -> date_task.Evaluation:
            return date_task.evaluate(model, task.tokenizer, task.held_out, samples=0)

        model = LoraModel.from_pretrained(load_model(source, quant), tmp)
        reloaded = score(model)
        model.merge_adapter()
        merged = score(model)
        dense = score(model.merge_and_unload(dequantize=True))
    return QualityResult(quant, quantizer(quant, default_group_size(model.config)), result.before.loss,
                         result.before.accuracy, result.after.loss, result.after.accuracy, merged.loss,
                         merged.accuracy, dense.loss, dense.accuracy, reloaded.loss, result.tokens_per_second,
                         peak_mib, adapter_mib, seconds)


class PeakMemory:
    """The process's peak resident memory from now on, above its resident memory now (Linux: VmHWM,
    restarted through /proc/self/clear_refs; `mib()` is None where that is not allowed)."""

    def __init__(self) -> None:
        from qlora_inject.bench import proc_status_mib, reset_peak_rss

        try:
            self.start: float | None = proc_status_mib("VmRSS") if reset_peak_rss() else None
        except OSError:
            self.start = None

    def mib(self) -> float | None:
        from qlora_inject.bench import proc_status_mib

        return None if self.start is None else proc_status_mib("VmHWM") - self.start


def run_quality(workload: QualityWorkload = QualityWorkload(),
                log: Callable[[str], None] = print) -> tuple[list[QualityResult], dict[str, str]]:
    """One `QualityResult` per format of `workload`, each in a process of its own (`parallel` at a time)
    unless `own_process` is False; and, by format, why a format's run failed (the others still run).

    Raises:
        ValueError: A format no backend is registered for, naming the ones there are.
    """
    from concurrent.futures import ThreadPoolExecutor

    from qlora_inject.registry import default_quant

    formats = [default_quant(quant) for quant in workload.formats]   # "dense" is "none"; unknown names fail now

    def run(quant: str) -> QualityResult | str:
        began = time.perf_counter()
        try:
            result = _in_own_process(quant, workload) if workload.own_process else measure_format(quant, workload, log)
        except RuntimeError as err:
            log(f"{quant}: failed: {err}")
            return str(err)
        log(f"{quant}: tuned loss {result.tuned_loss:.3f}, exact match {result.tuned_match:.0%}; "
            f"merged {result.merged_loss:.3f}, dense {result.dense_merged_loss:.3f} "
            f"({time.perf_counter() - began:.0f} s)")
        return result

    workers = workload.parallel if workload.own_process else 1
    with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
        outcomes = list(pool.map(run, formats))
    results = [outcome for outcome in outcomes if isinstance(outcome, QualityResult)]
    failures = {quant: outcome for quant, outcome in zip(formats, outcomes, strict=True) if isinstance(outcome, str)}
    return results, failures


def _in_own_process(quant: str, workload: QualityWorkload) -> QualityResult:
    """`measure_format` in a fresh Python process, its result passed back as JSON.

    Raises:
        RuntimeError: The run failed; its last output lines are in the message.
    """
    with tempfile.TemporaryDirectory(prefix="qlora-inject-quality-") as tmp:
        path = Path(tmp) / "result.json"
        threads = [] if workload.threads is None else ["--threads", str(workload.threads)]
        done = subprocess.run([sys.executable, "-m", "qlora_inject.quality", quant, "--steps", str(workload.steps),
                               "--seed", str(workload.seed), *threads, "--json", str(path)], capture_output=True,
                              text=True)
        if done.returncode or not path.is_file():
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise RuntimeError(f"the {quant} run failed (exit status {done.returncode}):\n{tail}")
        return QualityResult(**json.loads(path.read_text()))


# --- the report ----------------------------------------------------------------------------------

COLUMNS = ("format", "quantizer", "base loss", "base exact match", "tuned loss", "tuned exact match",
           "merged in format: loss", "exact match", "gain kept", "merged dense: loss", "exact match",
           "train tokens/s", "peak RSS MiB", "adapter MiB", "train + eval s")


def quality_rows(results: Sequence[QualityResult]) -> list[list[str]]:
    """The table's cells, one row per format (`COLUMNS`)."""
    return [[r.quant, r.quantizer, f"{r.base_loss:.3f}", f"{r.base_match:.0%}", f"{r.tuned_loss:.3f}",
             f"{r.tuned_match:.0%}", f"{r.merged_loss:.3f}", f"{r.merged_match:.0%}", f"{r.kept:.0%}",
             f"{r.dense_merged_loss:.3f}", f"{r.dense_merged_match:.0%}", f"{r.tokens_per_second:,.0f}",
             "—" if r.peak_rss_mib is None else f"{r.peak_rss_mib:,.0f}", f"{r.adapter_mib:.1f}",
             f"{r.train_seconds:.0f}"] for r in results]


def quality_report(workload: QualityWorkload, results: Sequence[QualityResult], failures: dict[str, str] | None = None,
                   load: str = "") -> str:
    """The markdown report: the question, machine, workload, one row per format, and the formats that failed."""
    from qlora_inject.bench import machine, markdown_table

    return "\n".join([
        "Which format should I fine-tune in? The default job (SmolLM2-135M-Instruct, LoRA r 16 / alpha 32 on "
        f"every linear layer, {workload.steps} steps of 8 date examples, lr 3e-3, seed {workload.seed}) in each "
        "format, scored on the same 48 held-out dates (answer loss; exact match under greedy decoding).",
        "",
        f"machine: {machine()}{'; ' + load if load else ''}; torch threads: "
        f"{workload.threads or 'default (' + str(torch.get_num_threads()) + ')'}; formats run {workload.parallel} "
        "at a time",
        "base: the quantized model before training; tuned: with the adapter; merged in format: "
        "requantize(dequantize(W) + s·BA) (`merge_adapter`), gain kept = (base − merged) / (base − tuned); "
        "merged dense: `merge_and_unload(dequantize=True)`; tokens/s: training, padded batch tokens; peak RSS: "
        "the process's peak resident memory over loading, quantizing and training, above its memory before "
        "(each format in its own process); train + eval s: the whole `train` call under the load named above.",
        "",
        markdown_table(COLUMNS, quality_rows(results)),
        *[f"\n{quant} failed: {' '.join(why.split())}" for quant, why in (failures or {}).items()],
    ])


def plot_quality(results: Sequence[QualityResult], path: Path) -> None:
    """Held-out answer loss and exact match per format: base, tuned, merged in format, merged dense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r.quant for r in results]
    stages = {"base": ("base_loss", "base_match"), "tuned": ("tuned_loss", "tuned_match"),
              "merged in format": ("merged_loss", "merged_match"),
              "merged dense": ("dense_merged_loss", "dense_merged_match")}
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / len(stages)
    for column, (axis, title) in enumerate(zip(axes, ("held-out answer loss (lower is better)",
                                                      "held-out exact match (higher is better)"), strict=True)):
        for i, (stage, names) in enumerate(stages.items()):
            offset = (i - (len(stages) - 1) / 2) * width
            values = [getattr(r, names[column]) * (100 if column else 1) for r in results]
            axis.bar([p + offset for p in range(len(labels))], values, width=width, label=stage)
        axis.set_xticks(list(range(len(labels))), labels)
        axis.set_title(title, fontsize=10)
        axis.set_ylabel("%" if column else "loss")
    axes[0].legend(fontsize=8)
    figure.suptitle("SmolLM2-135M-Instruct, the date task: one LoRA fine-tune per format", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def save_quality(directory: Path, workload: QualityWorkload, results: Sequence[QualityResult],
                 failures: dict[str, str] | None = None, load: str = "") -> str:
    """Write `quality.md`, `quality.png` and `quality.json` (the numbers) into `directory`; return the report."""
    from qlora_inject.bench import save_report

    text = quality_report(workload, results, failures, load)
    save_report(directory, "quality", text, lambda path: plot_quality(results, path))
    (directory / "quality.json").write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")
    return text


def cpu_note() -> str:
    """The vector extensions the CPU kernels can use, and the load average now (other jobs share the cores)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    wanted = [name for name in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {name}" in flags]
    return f"CPU flags {', '.join(wanted) or 'unknown'}; load average {os.getloadavg()[0]:.1f}"


def benchmark(workload: QualityWorkload, output: Path, log: Callable[[str], None] = print) -> str:
    """Run `workload`, write quality.md/.png/.json into `output`, and return the report (what
    `qlora-inject bench --quality` and `benchmarks/bench_quality.py` do)."""
    start = cpu_note()
    results, failures = run_quality(workload, log)
    load = f"{start} at the start, {os.getloadavg()[0]:.1f} at the end"
    return save_quality(output, workload, results, failures, load)


def _main(argv: list[str] | None = None) -> int:
    """One format in this process (what `run_quality` starts): writes its `QualityResult` as JSON."""
    parser = argparse.ArgumentParser(prog="python -m qlora_inject.quality")
    parser.add_argument("quant")
    parser.add_argument("--steps", type=int, default=QualityWorkload.steps)
    parser.add_argument("--seed", type=int, default=QualityWorkload.seed)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    result = measure_format(args.quant, QualityWorkload((args.quant,), args.steps, args.seed, own_process=False,
                                                        threads=args.threads))
    args.json.write_text(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
