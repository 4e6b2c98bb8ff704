"""Question: what does a LoRA-wrapped quantized Llama MLP block cost to train, per format, against PEFT
and against the dense block?

transformers' `LlamaMLP` (gate/up/down, hidden 2048, intermediate 5632), every projection quantized
by its format's library, LoRA r = 16 on all three, 2 × 128 tokens, forward + backward (input gradient
included), medians from one run.

    python benchmarks/bench_block.py [--formats dense,nf4,int8] [--output benchmarks/results]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from qlora_inject import LoraConfig, inject
from qlora_inject.backends.bnb import never_repack
from qlora_inject.bench import machine, markdown_table, median_seconds, plot_bars, save_report
from qlora_inject.quantize import quantize_model
from qlora_inject.registry import quantized_names

PROJECTIONS = ["gate_proj", "up_proj", "down_proj"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="a LoRA-wrapped quantized Llama MLP: ours vs PEFT vs dense")
    parser.add_argument("--formats", default=",".join(quantized_names()), help="default: every registered format")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    import peft
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    dense = LlamaMLP(LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate)).requires_grad_(False)
    x = torch.randn(2, 128, args.hidden, requires_grad=True)
    grad = torch.randn(2, 128, args.hidden)

    def step_of(block: torch.nn.Module):
        def step() -> None:
            x.grad = None
            block(x).backward(grad)
        return step

    dense_time = median_seconds(step_of(dense), args.repeat)
    config = dict(r=16, lora_alpha=32, target_modules=PROJECTIONS, init_lora_weights=False)
    rows, ratios = [], {"qlora_inject": [], "PEFT": []}
    for fmt in args.formats.split(","):
        ours = quantize_model(copy.deepcopy(dense), fmt, skip=())             # each format's own group size
        theirs = quantize_model(copy.deepcopy(dense), fmt, skip=())
        for model in (ours, theirs):                                       # no in-place CPU repack in either
            never_repack(model)
        inject(ours, LoraConfig(**config))
        theirs.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)   # PEFT reads a device off it
        peft.LoraModel(theirs, peft.LoraConfig(**config), "default")
        ours_time, peft_time = median_seconds(step_of(ours), args.repeat), median_seconds(step_of(theirs), args.repeat)
        rows.append([fmt, f"{ours_time * 1e3:.0f}", f"{peft_time * 1e3:.0f}", f"{dense_time * 1e3:.0f}",
                     f"{ours_time / dense_time:.2f}", f"{peft_time / dense_time:.2f}", f"{ours_time / peft_time:.2f}"])
        ratios["qlora_inject"].append(ours_time / dense_time)
        ratios["PEFT"].append(min(peft_time / dense_time, 5.0))             # AWQ's 150x would flatten the rest
    text = "\n".join([
        f"machine: {machine()}",
        f"workload: LlamaMLP {args.hidden}/{args.intermediate}, LoRA r=16 on gate/up/down, 2 x 128 tokens, fp32, "
        f"forward + backward, median of {args.repeat}",
        "",
        markdown_table(["format", "ours ms", "PEFT ms", "dense ms", "ours/dense", "PEFT/dense", "ours/PEFT"], rows),
    ])
    print(text)
    if args.output is not None:
        save_report(args.output, "block", text, lambda path: plot_bars(
            path, "Llama MLP block, forward + backward (PEFT capped at 5)", [r[0] for r in rows], ratios,
            "time / dense block", reference=(1.0, "dense block")))


if __name__ == "__main__":
    main()
