"""Question: what do the fused RMSNorm and SwiGLU of `fuse_llama_ops` cost, and keep for backward,
against transformers' own modules?

RMSNorm: `LlamaRMSNorm` (weight frozen, as in LoRA training) vs `FusedRMSNorm` over (tokens, hidden).
SwiGLU: the gate of `LlamaMLP`, `act_fn(g) · u`, vs `swiglu(g, u)` over (tokens, intermediate). Each
forward + backward (input gradients), median of `--repeat` after a warm-up, timed with CUDA events on
a GPU (where the Triton kernels run) and wall time on the CPU (where the torch twins run); bytes kept
for backward counted by `saved_tensors_hooks`. Default shapes: Llama-3.1-8B's, 2,048 tokens.

    python benchmarks/bench_fused_ops.py [--device cuda] [--dtype bf16,fp32] [--output benchmarks/results]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from qlora_inject.bench import machine, markdown_table, median_seconds, plot_bars, save_report, saved_for_backward_bytes
from qlora_inject.fused_ops import FusedRMSNorm
from qlora_inject.kernels.swiglu import swiglu

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def contenders(op: str, tokens: int, width: int, dtype: torch.dtype,
               device: str) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor], list[torch.Tensor]]:
    """(eager forward, fused forward, the inputs whose gradients they make) for one op."""
    from transformers.activations import ACT2FN
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    if op == "RMSNorm":
        eager = LlamaRMSNorm(width).to(device=device, dtype=dtype).requires_grad_(False)
        fused = FusedRMSNorm(eager)
        x = torch.randn(tokens, width, device=device, dtype=dtype, requires_grad=True)
        return (lambda: eager(x)), (lambda: fused(x)), [x]
    act_fn = ACT2FN["silu"]                                                 # what LlamaMLP runs
    g, u = (torch.randn(tokens, width, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    return (lambda: act_fn(g) * u), (lambda: swiglu(g, u)), [g, u]


def step_of(forward: Callable[[], torch.Tensor], inputs: list[torch.Tensor], grad: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        for tensor in inputs:
            tensor.grad = None
        forward().backward(grad)
    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="fused RMSNorm / SwiGLU vs transformers' own modules")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--dtype", default="bf16,fp32", help=f"comma-separated, of {', '.join(DTYPES)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    for name in args.dtype.split(","):
        if name not in DTYPES:
            parser.error(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    torch.manual_seed(0)
    rows, labels, ratios = [], [], {"time fused / eager": [], "kept for backward fused / eager": []}
    for name in args.dtype.split(","):
        for op, width in (("RMSNorm", args.hidden), ("SwiGLU", args.intermediate)):
            eager, fused, inputs = contenders(op, args.tokens, width, DTYPES[name], args.device)
            grad = torch.randn(args.tokens, width, device=args.device, dtype=DTYPES[name])
            eager_time = median_seconds(step_of(eager, inputs, grad), args.repeat)
            fused_time = median_seconds(step_of(fused, inputs, grad), args.repeat)
            eager_kept, fused_kept = saved_for_backward_bytes(eager), saved_for_backward_bytes(fused)
            rows.append([op, name, f"{eager_time * 1e3:.3f}", f"{fused_time * 1e3:.3f}",
                         f"{fused_time / eager_time:.2f}", f"{eager_kept / 2**20:.1f}", f"{fused_kept / 2**20:.1f}"])
            labels.append(f"{op} {name}")
            ratios["time fused / eager"].append(fused_time / eager_time)
            ratios["kept for backward fused / eager"].append(fused_kept / eager_kept)
    text = "\n".join([
        f"machine: {machine()}",
        f"workload: {args.tokens} tokens, RMSNorm over hidden {args.hidden} (weight frozen), SwiGLU over "
        f"intermediate {args.intermediate}; forward + backward on {args.device}, median of {args.repeat}; "
        "eager = transformers' LlamaRMSNorm / LlamaMLP's act_fn(g) * u, fused = fuse_llama_ops' modules "
        f"({'Triton kernels' if args.device.startswith('cuda') else 'torch twins'})",
        "",
        markdown_table(["op", "dtype", "eager ms", "fused ms", "fused/eager time", "eager kept MiB",
                        "fused kept MiB"], rows),
    ])
    print(text)
    if args.output is not None:
        save_report(args.output, "fused_ops", text, lambda path: plot_bars(
            path, "fused RMSNorm / SwiGLU vs the eager modules", labels, ratios, "fused / eager",
            reference=(1.0, "eager")))


if __name__ == "__main__":
    main()
