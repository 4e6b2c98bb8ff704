"""Question: what does one LoRA-wrapped quantized linear cost to train, per format, against PEFT and
against a dense layer of the same shape?

One linear (default 4096 → 11008), 128 tokens, r = 16, forward + backward (input gradient included,
as inside a model). Columns: this project, PEFT over the very same quantized module (where PEFT
wraps that format), the dense layer alone; medians and ratios from one run; bytes autograd saves
for backward.

    python benchmarks/bench_layer.py                 # the full shape
    python benchmarks/bench_layer.py --quick         # 1024 → 2816, for a smoke run
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, markdown_table, median_seconds, saved_for_backward_bytes, write_results  # noqa: E402

from qlora_inject import LoraConfig, inject  # noqa: E402
from qlora_inject.quantize import quantize_linear  # noqa: E402


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def build(fmt: str, dense: nn.Linear) -> nn.Module:
    if fmt == "dense":
        return copy.deepcopy(dense)
    return quantize_linear(dense, fmt, compute_dtype=torch.float32)


def step_of(model: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    def step() -> None:
        x.grad = None
        model(x).backward(grad)
    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--in-features", type=int, default=4096)
    parser.add_argument("--out-features", type=int, default=11008)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--formats", default="dense,nf4,fp4,int8,hqq")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="1024 → 2816, 3 repeats")
    parser.add_argument("--output", type=Path, default=None, help="folder for the markdown table")
    args = parser.parse_args(argv)
    if args.quick:
        args.in_features, args.out_features, args.repeat = 1024, 2816, 3
    import peft

    torch.manual_seed(0)
    dense = nn.Linear(args.in_features, args.out_features, bias=False).requires_grad_(False)  # frozen, as a base
    x = torch.randn(args.tokens, args.in_features, requires_grad=True)
    grad = torch.randn(args.tokens, args.out_features)
    dense_time = median_seconds(step_of(dense, x, grad), args.repeat)
    rows = []
    for fmt in args.formats.split(","):
        base = build(fmt, dense)
        ours = Holder(base)
        inject(ours, LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=["proj"], init_lora_weights=False))
        theirs = Holder(build(fmt, dense))
        for module in theirs.modules():                       # keep bitsandbytes' CPU repack off, as ours does
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
        peft.LoraModel(theirs, peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=["proj"],
                                               init_lora_weights=False), "default")
        ours_time = median_seconds(step_of(ours, x, grad), args.repeat)
        peft_time = median_seconds(step_of(theirs, x, grad), args.repeat)
        ours_saved = saved_for_backward_bytes(lambda m=ours: m(x))
        peft_saved = saved_for_backward_bytes(lambda m=theirs: m(x))
        rows.append([fmt, f"{ours_time * 1e3:.1f}", f"{peft_time * 1e3:.1f}", f"{dense_time * 1e3:.1f}",
                     f"{ours_time / dense_time:.2f}", f"{peft_time / dense_time:.2f}", f"{ours_time / peft_time:.2f}",
                     f"{ours_saved / 2**20:.1f}", f"{peft_saved / 2**20:.1f}"])
    text = "\n".join([
        f"machine: {machine()}",
        f"workload: one linear {args.in_features} -> {args.out_features}, {args.tokens} tokens, r={args.r}, "
        f"fp32 compute, forward + backward, median of {args.repeat}",
        "",
        markdown_table(["format", "ours ms", "PEFT ms", "dense ms", "ours/dense", "PEFT/dense", "ours/PEFT",
                        "ours saved MiB", "PEFT saved MiB"], rows),
    ])
    write_results("layer", text, args.output)


if __name__ == "__main__":
    main()
