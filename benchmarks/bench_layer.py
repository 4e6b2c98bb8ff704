"""Question: what does one LoRA-wrapped quantized linear cost to train, per format, against PEFT and
against a dense layer of the same shape? (The code lives in `qlora_inject.bench`; `qlora-inject bench`
runs the same.)

    python benchmarks/bench_layer.py                 # 4096 -> 11008, 128 tokens, r = 16
    python benchmarks/bench_layer.py --quick         # 1024 -> 2816
    python benchmarks/bench_layer.py --output benchmarks/results
    python benchmarks/bench_layer.py --dora --formats dense,nf4,int8,hqq,gptq,awq   # DoRA adapters
    python benchmarks/bench_layer.py --dropout 0.05  # lora_dropout as in the seed script (layer_dropout.md)
    python benchmarks/bench_layer.py --dtype bf16    # bf16 weights, inputs and compute (layer_bf16.md)
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from qlora_inject.bench import QUICK, LayerWorkload, layer_report, run_layer_benchmark, save_layer_results

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one LoRA layer per format: this library vs PEFT vs dense")
    parser.add_argument("--quick", action="store_true", help="1024 -> 2816 instead of 4096 -> 11008")
    parser.add_argument("--formats", default=None, help="comma-separated, e.g. dense,nf4,int8")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--dora", action="store_true", help="DoRA adapters (results as layer_dora.md/.png)")
    parser.add_argument("--dropout", type=float, default=0.0, help="lora_dropout (results as layer_dropout.md/.png)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="weights, inputs and compute (results of bf16/fp16 as layer_bf16.md, ...)")
    parser.add_argument("--output", type=Path, default=None, help="folder for layer.md and layer.png")
    args = parser.parse_args(argv)
    workload = QUICK if args.quick else LayerWorkload()
    if args.formats:
        workload = dataclasses.replace(workload, formats=tuple(args.formats.split(",")))
    if args.repeat:
        workload = dataclasses.replace(workload, repeat=args.repeat)
    if args.dora:
        workload = dataclasses.replace(workload, dora=True)
    if args.dropout:
        workload = dataclasses.replace(workload, dropout=args.dropout)
    workload = dataclasses.replace(workload, dtype=DTYPES[args.dtype])
    results = run_layer_benchmark(workload)
    text = layer_report(workload, results)
    print(text)
    if args.output is not None:
        save_layer_results(text, results, args.output, workload.name)


if __name__ == "__main__":
    main()
