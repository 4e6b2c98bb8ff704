"""Question: what does serving a batch whose tokens use 8 different adapters cost, against one adapter?

One quantized layer (default NF4, 4096 → 11008), 16 tokens spread over 8 adapters (r = 16): the
base plus (a) `LoraModel(..., adapter_names=...)` (which takes the gathered path for plain LoRA
adapters), (b) a loop with one pair of matmuls per adapter, (c) the gathered shrink/expand alone,
against the same 16 tokens through one adapter. Forward only, as in serving; medians from one run.

    python benchmarks/bench_mixed_adapters.py [--format nf4] [--tokens 16] [--adapters 8]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from qlora_inject import LoraConfig, LoraModel
from qlora_inject.bench import SingleLayerModel, machine, markdown_table, median_seconds, plot_bars, save_report
from qlora_inject.kernels.lora_batched import lora_gathered, lora_looped, stack_adapters
from qlora_inject.quantize import quantize_linear


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="mixed batch of many adapters on one quantized layer")
    parser.add_argument("--format", default="nf4")
    parser.add_argument("--in-features", type=int, default=4096)
    parser.add_argument("--out-features", type=int, default=11008)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=21)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    dense = nn.Linear(args.in_features, args.out_features, bias=False).requires_grad_(False)
    base = dense if args.format == "dense" else quantize_linear(dense, args.format)
    names = [f"a{i}" for i in range(args.adapters)]
    config = dict(r=args.r, lora_alpha=2 * args.r, target_modules=["proj"], init_lora_weights=False)
    model = LoraModel(SingleLayerModel(base), LoraConfig(**config), names[0]).eval()
    for name in names[1:]:
        model.add_adapter(name, LoraConfig(**config))
    layer = model.model.proj
    x = torch.randn(args.tokens, 1, args.in_features)                       # one token per sample
    per_token = [names[t % args.adapters] for t in range(args.tokens)]

    A, B = stack_adapters([(layer.lora_A[n].weight, layer.lora_B[n].weight) for n in names])
    scaling = torch.tensor([layer.scaling[n] for n in names])
    index = torch.tensor([t % args.adapters for t in range(args.tokens)])

    def mixed() -> None:
        model(x, adapter_names=per_token)

    def looped() -> None:
        flat = x.reshape(-1, args.in_features)
        layer.base_output(flat) + lora_looped(flat, A, B, scaling, index)

    def gathered() -> None:
        flat = x.reshape(-1, args.in_features)
        layer.base_output(flat) + lora_gathered(flat, A, B, scaling, index)

    def single() -> None:
        model(x)

    with torch.no_grad():
        reference = model(x, adapter_names=per_token).reshape(args.tokens, -1)
        flat = x.reshape(-1, args.in_features)
        check = layer.base_output(flat) + lora_gathered(flat, A, B, scaling, index)
        torch.testing.assert_close(check, reference, atol=1e-4, rtol=1e-4)
        times = {name: median_seconds(step, args.repeat) for name, step in
                 (("one adapter", single), ("LoraModel mixed batch", mixed), ("per-adapter loop", looped),
                  ("gathered shrink/expand", gathered))}
    base_time = times["one adapter"]
    rows = [[name, f"{seconds * 1e3:.2f}", f"{seconds / base_time:.2f}"] for name, seconds in times.items()]
    text = "\n".join([
        f"machine: {machine()}",
        f"workload: {args.format} linear {args.in_features} -> {args.out_features}, {args.tokens} tokens over "
        f"{args.adapters} adapters (r={args.r}), forward, median of {args.repeat}",
        "",
        markdown_table(["path", "ms", "time / one adapter"], rows),
    ])
    print(text)
    if args.output is not None:
        save_report(args.output, "mixed_adapters", text, lambda path: plot_bars(
            path, f"{args.tokens} tokens over {args.adapters} adapters, {args.format}", list(times),
            {"time / one adapter": [t / base_time for t in times.values()]}, "time / one adapter",
            reference=(1.5, "target")))


if __name__ == "__main__":
    main()
