"""Question: how fast, and in how much memory, does one LoRA training step of a quantized Llama run,
against PEFT over the very same quantized model?

A Llama-architecture model built from a config (random weights), every linear but the head quantized
to the format by its own library, LoRA r = 16 on all seven projections, AdamW. Speed: both
libraries' models, and this library's on the same model unquantized ("dense-LoRA", the same LoRA: the
quantization tax reads as ours/dense-LoRA), live in one process and their steps alternate, so all see the same machine
(separate runs on a shared CPU drift by 10 % and more). Memory: each (format, library) pair trains
in a fresh process, so its peak is its own, measured over the training steps only: resident memory
on CPU (its peak reset after the warm-up step), `torch.cuda.max_memory_allocated` on a GPU.

    python benchmarks/bench_model_step.py                       # CPU: 4 layers, hidden 512, 2 x 128, fp32 and bf16
    python benchmarks/bench_model_step.py --formats nf4 --steps 3
    python benchmarks/bench_model_step.py --preset llama-8b     # GPU: 8B-shaped NF4, 2 x 2048, bf16,
                                                                # gradient checkpointing (4 of its 32 layers)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from qlora_inject.backends.bnb import never_repack
from qlora_inject.bench import machine, markdown_table, plot_bars, proc_status_mib, reset_peak_rss, save_report
from qlora_inject.registry import quant_names

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PRESETS = {
    "llama-8b": dict(formats="nf4", hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256, layers=4,
                     batch=2, seq=2048, dtype="bf16", device="cuda", gradient_checkpointing=True, steps=5),
}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}      # dense, per GPU


def linear_parameters(args) -> int:
    """Parameters of every linear of the model (the head included), for 6·N·tokens FLOPs."""
    head_dim = args.hidden // args.heads
    attention = 2 * args.hidden * args.hidden + 2 * args.hidden * args.kv_heads * head_dim
    return args.layers * (attention + 3 * args.hidden * args.intermediate) + args.hidden * args.vocab


def build(fmt: str, library: str, dtype_name: str, args) -> Callable[[], None]:
    """One training step (forward, backward, AdamW) of a fresh model wrapped by `library`."""
    import warnings

    warnings.simplefilter("ignore")
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_inject.pretrained import quiet_transformers
    from qlora_inject.quantize import quantize_model

    quiet_transformers()
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), DTYPES[dtype_name]
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=2 * args.seq)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    quantize_model(model, fmt, compute_dtype=dtype, device=device)  # each format's own group size; none: as is
    never_repack(model)                                              # no in-place CPU repack in either library
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if library == "ours":
        from qlora_inject import LoraConfig, LoraModel

        model = LoraModel(model, LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS))
        if args.fuse == "on":
            from qlora_inject import fuse_llama_ops

            fuse_llama_ops(model)
    else:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)).to(device)

    chunked = library == "ours" and args.loss == "chunked"
    if chunked:
        from qlora_inject import causal_lm_loss

    def step() -> None:
        loss = causal_lm_loss(model, ids) if chunked else model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def timed(step: Callable[[], None], cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def memory_run(fmt: str, library: str, dtype_name: str, args, queue) -> None:
    """Peak memory of one library's training steps (a process of its own, so the peak is its own):
    on a GPU the peak allocated, on the CPU the peak resident memory while the steps ran (building
    and quantizing the model came before, and its peak is not counted where Linux lets the peak be
    reset)."""
    cuda = args.device.startswith("cuda")
    step = build(fmt, library, dtype_name, args)
    step()                                                              # warm-up
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss_reset = reset_peak_rss()
    scope = "training" if cuda or rss_reset else "process"
    before = proc_status_mib("VmRSS")
    for _ in range(2):
        timed(step, cuda)
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else rss_peak
    queue.put({"peak_mib": peak, "growth_mib": rss_peak - before, "peak_scope": scope})


def speed_run(fmt: str, dtype_name: str, args, queue) -> None:
    """Step time of both libraries in one process, their steps interleaved (ours, PEFT, ours, …) so
    that both see the same machine: on a shared CPU, separate runs drift by 10 % and more."""
    cuda = args.device.startswith("cuda")
    steps = {"ours": build(fmt, "ours", dtype_name, args)}
    try:
        steps["peft"] = build(fmt, "peft", dtype_name, args)
        steps["peft"]()                                                 # warm-up (and: does PEFT run it?)
    except Exception as err:                                           # PEFT cannot wrap or run this format
        print(f"PEFT on {fmt} {dtype_name}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        steps.pop("peft", None)
    steps["ours"]()
    if fmt != "none":                                                   # the tax: the same model unquantized,
        steps["dense"] = build("none", "ours", dtype_name, args)        # the same LoRA, in the same rotation
        steps["dense"]()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            times[name].append(timed(step, cuda))
    queue.put({name: statistics.median(values) for name, values in times.items()})


def in_process(target, *args_) -> dict | None:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=args_ + (queue,))
    process.start()
    process.join()
    return queue.get() if not queue.empty() else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one LoRA training step of a quantized Llama: ours vs PEFT")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="defaults for a named workload")
    parser.add_argument("--formats", default=",".join(quant_names()), help="default: every registered format")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=None, help="default: about 2.75 x hidden")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="fp32,bf16", help=f"comma-separated, of {', '.join(DTYPES)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--loss", choices=("chunked", "model"), default="chunked",
                        help="ours: this library's chunked causal_lm_loss (as `qlora-inject train` uses) or the "
                             "model's own loss; PEFT always uses the model's own")
    parser.add_argument("--fuse", choices=("on", "off"), default="on",
                        help="ours: fuse_llama_ops (RMSNorm and the MLP gate as one autograd op each), as "
                             "`qlora-inject train` does; PEFT always runs the model's own modules")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.preset:
        parser.set_defaults(**PRESETS[args.preset])
        args = parser.parse_args(argv)                                  # explicit flags still win
    args.intermediate = args.intermediate or args.hidden * 11 // 4 // 64 * 64
    dtypes = args.dtype.split(",")
    for name in dtypes:
        if name not in DTYPES:
            parser.error(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    rows, raw = [], {}
    tokens = args.batch * args.seq
    peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if args.device.startswith("cuda")
                       and k in torch.cuda.get_device_name()), None)
    for fmt, dtype_name in ((f, d) for d in dtypes for f in args.formats.split(",")):
        speed = in_process(speed_run, fmt, dtype_name, args) or {}
        ours = theirs = None
        if "ours" in speed:
            ours = in_process(memory_run, fmt, "ours", dtype_name, args)
        if "peft" in speed:
            theirs = in_process(memory_run, fmt, "peft", dtype_name, args)
        for result, library in ((ours, "ours"), (theirs, "peft")):
            if result is not None:
                result["seconds"] = speed[library]
        dense_s = speed.get("dense", speed.get("ours") if fmt == "none" else None)
        key = fmt if len(dtypes) == 1 else f"{fmt} {dtype_name}"
        raw[key] = {"ours": ours, "peft": theirs, "dense_lora_seconds": dense_s}
        if ours is None:
            continue

        def rate(result: dict | None) -> str:
            return "—" if result is None else f"{tokens / result['seconds']:,.0f}"

        def mfu(result: dict | None) -> str:
            if result is None or peak_flops is None:
                return "—"
            return f"{6 * linear_parameters(args) * tokens / result['seconds'] / peak_flops:.1%}"

        def ratio(a: float | None, b: float | None) -> str:
            return "—" if a is None or b is None else f"{a / b:.2f}"

        dense_rate = "—" if dense_s is None else f"{tokens / dense_s:,.0f}"
        rows.append([fmt, dtype_name, rate(ours), dense_rate, ratio(ours["seconds"], dense_s), rate(theirs),
                     ratio(theirs and theirs["seconds"], ours["seconds"]),
                     mfu(ours), mfu(theirs), f"{ours['peak_mib']:,.0f}",
                     "—" if theirs is None else f"{theirs['peak_mib']:,.0f}",
                     ratio(ours["peak_mib"], theirs and theirs["peak_mib"]), f"{round(ours['growth_mib']):,}",
                     "—" if theirs is None else f"{round(theirs['growth_mib']):,}"])
    scopes = {raw[f][library]["peak_scope"] for f in raw for library in ("ours", "peft") if raw[f][library]}
    memory = ("peak allocated MiB" if args.device.startswith("cuda") else
              "peak RSS in training MiB" if scopes == {"training"} else "peak RSS MiB")
    growth = "RSS growth in training MiB"
    text = "\n".join([
        f"machine: {machine()}",
        f"workload: Llama {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, vocabulary "
        f"{args.vocab}, LoRA r=16 on 7 projections, AdamW, batch {args.batch} x {args.seq} tokens, "
        f"{' and '.join(dtypes)} on "
        f"{args.device}{', gradient checkpointing' if args.gradient_checkpointing else ''}; loss: ours "
        f"{'causal_lm_loss (chunked)' if args.loss == 'chunked' else 'the model'}, PEFT the model; ours "
        f"{'with' if args.fuse == 'on' else 'without'} fused RMSNorm/SwiGLU; speed: both "
        f"libraries and ours on the same model unquantized (dense-LoRA: the quantization tax is ours/dense-LoRA) "
        f"in one process, steps interleaved, median of {args.steps} each after one warm-up; memory: one "
        "process per library, peak over 2 steps after a warm-up step (model building not counted); "
        "MFU = 6 x linear parameters x tokens/s over the GPU's dense bf16 peak",
        "",
        markdown_table(["format", "dtype", "ours tokens/s", "dense-LoRA tokens/s", "ours/dense-LoRA time",
                        "PEFT tokens/s", "speed-up (PEFT time / ours)", "ours MFU",
                        "PEFT MFU", f"ours {memory}", f"PEFT {memory}", "memory ours/PEFT", f"ours {growth}",
                        f"PEFT {growth}"], rows),
    ])
    print(text)
    if args.output is not None:
        name = f"model_step_{args.preset}" if args.preset else "model_step"
        measured = [f for f in raw if raw[f]["ours"]]
        speed = {library: [tokens / raw[f][key]["seconds"] if raw[f][key] else 0 for f in measured]
                 for library, key in (("qlora_inject", "ours"), ("PEFT", "peft"))}
        save_report(args.output, name, text, lambda path: plot_bars(
            path, "one LoRA training step", measured, speed, "tokens / s"))
        (args.output / f"{name}.json").write_text(json.dumps(raw, indent=2))


if __name__ == "__main__":
    main()
