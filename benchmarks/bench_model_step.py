"""Question: how fast, and in how much memory, does one LoRA training step of a small quantized Llama
run here, against PEFT over the very same quantized model?

A Llama-architecture model built from a config (random weights; default 4 layers, hidden 512),
quantized to each format, LoRA r = 16 on all seven projections, AdamW, batch 2 × 128 tokens. Each
(format, library) pair runs in a fresh process, so its peak resident memory is its own.

    python benchmarks/bench_model_step.py                       # every format, 5 timed steps
    python benchmarks/bench_model_step.py --formats nf4 --steps 3
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from qlora_inject.bench import machine, markdown_table

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def one_run(fmt: str, library: str, hidden: int, layers: int, batch: int, seq: int, steps: int, queue) -> None:
    import warnings

    warnings.simplefilter("ignore")
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_inject.train import load_model, quiet_transformers

    quiet_transformers()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=hidden * 11 // 4 // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=2 * seq)
    with tempfile.TemporaryDirectory() as tmp:
        LlamaForCausalLM(config).save_pretrained(tmp)
        model = load_model(Path(tmp), fmt)
    for module in model.modules():                                   # no in-place CPU repack in either library
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    if library == "ours":
        from qlora_inject import LoraConfig, LoraModel

        model = LoraModel(model, LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS))
    else:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 4096, (batch, seq), generator=torch.Generator().manual_seed(1))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for step in range(steps + 1):                                     # the first step is warm-up
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"seconds": statistics.median(times), "peak_mib": peak / 1024, "growth_mib": (peak - before) / 1024})


def measure(fmt: str, library: str, args) -> dict | None:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=one_run, args=(fmt, library, args.hidden, args.layers, args.batch, args.seq,
                                                     args.steps, queue))
    process.start()
    process.join()
    return queue.get() if not queue.empty() else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one LoRA training step of a small quantized Llama: ours vs PEFT")
    parser.add_argument("--formats", default="none,nf4,int8,hqq,gptq,awq")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    rows, raw = [], {}
    tokens = args.batch * args.seq
    for fmt in args.formats.split(","):
        ours, theirs = measure(fmt, "ours", args), measure(fmt, "peft", args)
        raw[fmt] = {"ours": ours, "peft": theirs}
        if ours is None:
            continue

        def rate(result: dict | None) -> str:
            return "—" if result is None else f"{tokens / result['seconds']:,.0f}"

        rows.append([fmt, rate(ours), rate(theirs),
                     "—" if theirs is None else f"{theirs['seconds'] / ours['seconds']:.2f}",
                     f"{ours['peak_mib']:,.0f}", "—" if theirs is None else f"{theirs['peak_mib']:,.0f}"])
    text = "\n".join([
        f"machine: {machine()}",
        f"workload: Llama {args.layers} layers, hidden {args.hidden}, LoRA r=16 on 7 projections, AdamW, "
        f"batch {args.batch} x {args.seq} tokens, fp32 compute, median of {args.steps} steps after one warm-up",
        "",
        markdown_table(["format", "ours tokens/s", "PEFT tokens/s", "speed-up (PEFT time / ours)",
                        "ours peak RSS MiB", "PEFT peak RSS MiB"], rows),
    ])
    print(text)
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "model_step.md").write_text(text + "\n")
        (args.output / "model_step.json").write_text(json.dumps(raw, indent=2))


if __name__ == "__main__":
    main()
