"""The cross-format layer benchmark: one LoRA-wrapped linear per format, this library vs PEFT vs dense.

Question: what does one LoRA-wrapped quantized linear cost to train, per format, against PEFT over
the very same quantized module and against a frozen dense layer of the same shape? Forward +
backward (the input gradient included, as inside a model), medians of several runs, the three
steps of a row run in turn (so each row's ratios come from the same moments of the machine), and
the bytes autograd saves for backward.
"""

from __future__ import annotations

import copy
import importlib.metadata
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qlora_inject.backends.bnb import never_repack
from qlora_inject.config import LoraConfig
from qlora_inject.inject import inject
from qlora_inject.registry import format_available, quantized_names


@dataclass(frozen=True)
class LayerWorkload:
    in_features: int = 4096
    out_features: int = 11008
    tokens: int = 128
    r: int = 16
    repeat: int = 7
    formats: tuple[str, ...] | None = None                                  # None: dense and every registered format
    dora: bool = False                                                      # DoRA adapters instead of plain LoRA
    dropout: float = 0.0                                                    # lora_dropout (the seed script: 0.05)
    dtype: torch.dtype = torch.float32                                      # weights, inputs and compute

    @property
    def name(self) -> str:
        """The results' file name: layer, layer_dora, layer_dropout, layer_dora_dropout (+ _bf16, _fp16)."""
        suffix = {torch.float32: "", torch.bfloat16: "_bf16", torch.float16: "_fp16"}[self.dtype]
        return "layer" + ("_dora" if self.dora else "") + ("_dropout" if self.dropout else "") + suffix


@dataclass(frozen=True)
class LayerResult:
    fmt: str
    ours_s: float
    peft_s: float | None
    dense_s: float
    ours_saved: int
    peft_saved: int | None


QUICK = LayerWorkload(in_features=1024, out_features=2816, repeat=5)


def reset_peak_rss() -> bool:
    """Start the process's peak resident memory (Linux VmHWM, `ru_maxrss`) afresh from now, as
    `torch.cuda.reset_peak_memory_stats` does on a GPU; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def proc_status_mib(field: str) -> float:
    """A memory line of /proc/self/status (`VmRSS`, `VmHWM`, ...) in MiB.

    Raises:
        OSError: no such file or line (not Linux).
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024                              # kB
    raise OSError(f"/proc/self/status has no {field} line")


def machine() -> str:
    """One line naming the machine and the library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{cpu}, {os.cpu_count()} cores"
    versions = []
    for package in ("torch", "bitsandbytes", "hqq", "gptqmodel", "autoawq", "peft", "transformers"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return f"{device}; {', '.join(versions)}"


def median_seconds(step: Callable[[], None], repeat: int = 7, warmup: int = 2) -> float:
    """Median time of `step` over `repeat` runs after `warmup` runs: CUDA events when a GPU is present
    (the GPU's own clock, no host overhead counted twice), wall time otherwise."""
    return interleaved_medians({"step": step}, repeat, warmup)["step"]


def interleaved_medians(steps: dict[str, Callable[[], None]], repeat: int = 7, warmup: int = 2) -> dict[str, float]:
    """Median time of each step, the steps run in turn so that every one sees the same machine (on a
    shared CPU, times measured one after the other drift by 10 % and more), the order rotated each round
    (a, b, c, then b, c, a, then c, a, b, …) so that no step always follows the same one (PEFT's steps
    allocate and free whole dense weights; the step after them would always pay for that)."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for round_ in range(repeat):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            times[name].append(_seconds(steps[name]))
    return {name: statistics.median(values) for name, values in times.items()}


def _seconds(step: Callable[[], None]) -> float:
    if torch.cuda.is_available():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    began = time.perf_counter()
    step()
    return time.perf_counter() - began


def saved_for_backward_bytes(forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd keeps from one forward, each storage counted once."""
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = forward()
    del out
    return sum(seen.values())


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class SingleLayerModel(nn.Module):
    """One layer under the name `proj`, so this library and PEFT can both target it."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)     # PEFT reads a device off it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def bench_formats(workload: LayerWorkload) -> list[str]:
    """The workload's formats whose library is installed: as given, or dense and every registered quantized format."""
    names = workload.formats or ("dense", *quantized_names())
    return [name for name in names if format_available(name)]             # an unknown name is refused, named


def run_layer_benchmark(workload: LayerWorkload) -> list[LayerResult]:
    """Time every available format of `workload`; PEFT's column is None where PEFT cannot wrap it."""
    from qlora_inject.quantize import quantize_linear

    torch.manual_seed(0)
    dtype = workload.dtype
    dense = nn.Linear(workload.in_features, workload.out_features, bias=False).requires_grad_(False).to(dtype)
    x = torch.randn(workload.tokens, workload.in_features, dtype=dtype, requires_grad=True)
    grad = torch.randn(workload.tokens, workload.out_features, dtype=dtype)

    def step_of(model: nn.Module) -> Callable[[], None]:
        def step() -> None:
            x.grad = None
            model(x).backward(grad)
        return step

    def build(fmt: str) -> nn.Module:
        if fmt == "dense":
            return copy.deepcopy(dense)
        layer = quantize_linear(dense, fmt, compute_dtype=dtype)            # each format's own group size
        return never_repack(layer)                                        # no in-place CPU repack, as when wrapped

    results = []
    for fmt in bench_formats(workload):
        config = dict(r=workload.r, lora_alpha=2 * workload.r, target_modules=["proj"], init_lora_weights=False,
                      use_dora=workload.dora, lora_dropout=workload.dropout)
        ours = SingleLayerModel(build(fmt))
        inject(ours, LoraConfig(**config))
        steps = {"ours": step_of(ours), "dense": step_of(dense)}
        peft_saved = None
        try:
            import peft

            theirs = SingleLayerModel(build(fmt))
            peft.LoraModel(theirs, peft.LoraConfig(**config), "default")
            steps["peft"] = step_of(theirs)
            steps["peft"]()                                                 # does PEFT run it?
            peft_saved = saved_for_backward_bytes(lambda m=theirs: m(x))
        except Exception as err:                   # PEFT refuses this format here, or fails running it
            steps.pop("peft", None)
            print(f"PEFT on {fmt}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                  file=sys.stderr)
        seconds = interleaved_medians(steps, workload.repeat)               # ours, dense, PEFT in turn, rotated
        ours_saved = saved_for_backward_bytes(lambda m=ours: m(x))
        results.append(LayerResult(fmt, seconds["ours"], seconds.get("peft"), seconds["dense"], ours_saved,
                                   peft_saved))
    return results


def layer_report(workload: LayerWorkload, results: list[LayerResult]) -> str:
    """The markdown report: machine, workload, then one row per format."""
    def ms(seconds: float | None) -> str:
        return "—" if seconds is None else f"{seconds * 1e3:.1f}"

    def ratio(a: float | None, b: float | None) -> str:
        return "—" if a is None or b is None else f"{a / b:.2f}"

    def mib(count: int | None) -> str:
        return "—" if count is None else f"{count / 2**20:.1f}"

    rows = [[r.fmt, ms(r.ours_s), ms(r.peft_s), ms(r.dense_s), ratio(r.ours_s, r.dense_s), ratio(r.peft_s, r.dense_s),
             ratio(r.ours_s, r.peft_s), mib(r.ours_saved), mib(r.peft_saved)] for r in results]
    return "\n".join([
        f"machine: {machine()}",
        f"workload: one linear {workload.in_features} -> {workload.out_features}, {workload.tokens} tokens, "
        f"r={workload.r}{', DoRA' if workload.dora else ''}"
        f"{f', lora_dropout={workload.dropout:g}' if workload.dropout else ''}, "
        f"{str(workload.dtype).removeprefix('torch.')} compute, forward + backward, median of {workload.repeat}",
        *dequantization_notes(workload),
        "",
        markdown_table(["format", "ours ms", "PEFT ms", "dense ms", "ours/dense", "PEFT/dense", "ours/PEFT",
                        "ours saved MiB", "PEFT saved MiB"], rows),
    ])


def dequantization_notes(workload: LayerWorkload) -> list[str]:
    """What the CPU dequantization cost on this machine: the path `kernels.autotune` kept per class with
    the best time of each candidate, and the time to fill a tensor of the dense weight's size (the
    memory-write floor a dequantization that writes the whole weight cannot beat)."""
    from qlora_inject.kernels import autotune

    if torch.cuda.is_available():
        return []
    weight = torch.empty(workload.in_features * workload.out_features, dtype=workload.dtype)
    fill = median_seconds(lambda: weight.fill_(1.0), 5, warmup=1)
    lines = [f"writing the dense weight once ({weight.nbytes / 2**20:.0f} MiB, fill_): {fill * 1e3:.1f} ms"]
    for (fmt, dtype, out_dtype, _, threads), (chosen, timings) in autotune.decisions().items():
        ranked = sorted(timings.items(), key=lambda item: item[1])
        times = ", ".join(f"{name} {seconds * 1e3:.1f}" for name, seconds in ranked)
        product = fmt.startswith("base ")                                 # dequant_matmul_tiled's whole-or-tiles
        kind = f"with {str(out_dtype).removeprefix('torch.')} operands" if product else (
            "into a new tensor" if out_dtype is None else f"into the {str(out_dtype).removeprefix('torch.')} buffer")
        lines.append(f"{'path' if product else 'dequantization path'} kept for {fmt} "
                     f"{str(dtype).removeprefix('torch.')} {kind}, {threads} threads: {chosen} (best ms: {times})")
    return lines


def plot_bars(path: Path, title: str, labels: Sequence[str], series: dict[str, Sequence[float]], ylabel: str,
              reference: tuple[float, str] | None = None) -> None:
    """A grouped bar chart (one group per label, one bar per series) written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        offset = (i - (len(series) - 1) / 2) * width
        axis.bar([p + offset for p in range(len(labels))], values, width=width, label=name)
    if reference is not None:
        axis.axhline(reference[0], color="black", linewidth=0.8, linestyle="--", label=reference[1])
    axis.set_xticks(list(range(len(labels))), labels)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_layer(results: list[LayerResult], path: Path) -> None:
    """Bar chart of time relative to the dense layer, this library vs PEFT."""
    plot_bars(path, "one LoRA layer, forward + backward (PEFT capped at 5)", [r.fmt for r in results],
              {"qlora_inject": [r.ours_s / r.dense_s for r in results],
               "PEFT": [min((r.peft_s or 0) / r.dense_s, 5.0) for r in results]},   # AWQ's 60x hides the rest
              "time / dense layer", reference=(1.0, "dense layer"))


def save_report(directory: Path, name: str, text: str, plot: Callable[[Path], None] | None = None) -> None:
    """Write `text` as `<name>.md` into `directory` (created if needed) and, given `plot`, `<name>.png`."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.md").write_text(text + "\n")
    if plot is not None:
        plot(directory / f"{name}.png")


def save_layer_results(text: str, results: list[LayerResult], directory: Path, name: str = "layer") -> None:
    """Write the report as `<name>.md` and its plot as `<name>.png` into `directory`."""
    save_report(directory, name, text, lambda path: plot_layer(results, path))
