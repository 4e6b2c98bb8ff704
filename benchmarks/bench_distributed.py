"""Question: what does each rank hold, and how fast does a LoRA step run, with one process, DDP and
FSDP2 at world size 2, this library against PEFT?

A small Llama (random weights; `--hidden`, `--layers`) is quantized (NF4 with float32 storage so
FSDP2 shards it, or HQQ 4-bit, whose integer `W_q` stays whole on every rank); LoRA r=16 on every
linear; AdamW; the global batch (`--batch` rows of `--seq` tokens) is the same in every setting, split
over the ranks. Each setting runs in fresh processes (gloo on 127.0.0.1, or nccl on GPUs), so the
peak RSS is that setting's own. Per rank: base bytes (the quantized model's parameters and buffers
this rank holds, LoRA aside; bitsandbytes' absmax/quant_state are attributes, not counted), LoRA
bytes, AdamW state bytes, peak RSS (`ru_maxrss`); tokens/s of the whole group (global tokens per
step / median step time after a warm-up). The loss is each model's own `(...).loss` in both libraries.

    python benchmarks/bench_distributed.py [--formats nf4,hqq] [--steps 4] [--output benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ENGINES = {"one process": 1, "DDP": 2, "FSDP2": 2}
LIBRARIES = ("qlora_inject", "peft")


# --- one rank ------------------------------------------------------------------------------------

def build(directory: Path, hidden: int, layers: int) -> None:
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    config.to_json_file(directory / "config.json")
    save_file(model.state_dict(), directory / "model.safetensors", metadata={"format": "pt"})


def load(fmt: str, directory: Path):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    from qlora_inject.backends.bnb import never_repack

    if fmt == "hqq":
        from qlora_inject.quantize import quantize_model

        return quantize_model(LlamaForCausalLM.from_pretrained(directory), "hqq", group_size=64)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    model = LlamaForCausalLM.from_pretrained(directory, quantization_config=config, device_map=device)
    return never_repack(model)                           # keep bitsandbytes' trainable layout


def with_lora(library: str, model):
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(0)
    if library == "peft":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets, task_type="CAUSAL_LM"))
    import qlora_inject as qi

    return qi.LoraModel(model, qi.LoraConfig(r=16, lora_alpha=32, target_modules=targets))


def local_bytes(tensor) -> int:
    from qlora_inject.distributed import is_dtensor

    tensor = tensor.to_local() if is_dtensor(tensor) else tensor
    return tensor.numel() * tensor.element_size()


def rank_main(setting: dict) -> dict:
    import resource

    import torch.distributed as dist

    from qlora_inject.distributed import decoder_layers, unshardable_params

    world, rank = setting["world"], int(os.environ.get("RANK", "0"))
    model = with_lora(setting["library"], load(setting["format"], Path(setting["model"])))
    device = next(p.device for p in model.parameters() if p.requires_grad)
    wrapper = model
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if setting["engine"] == "DDP":
            from torch.nn.parallel import DistributedDataParallel

            wrapper = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        else:
            from torch.distributed.fsdp import fully_shard

            ignored = unshardable_params(model) or None
            for layer in decoder_layers(model):             # qi.shard's policy, applied alike to both libraries
                fully_shard(layer, ignored_params=ignored)
            fully_shard(model, ignored_params=ignored)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 1024, (setting["batch"], setting["seq"]), generator=torch.Generator().manual_seed(1))
    rows = setting["batch"] // world
    ids = ids[rank * rows:(rank + 1) * rows].to(device)
    times = []
    for step in range(setting["steps"] + 1):                # the first is the warm-up
        if world > 1:
            dist.barrier()
        began = time.perf_counter()
        wrapper(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if world > 1:
            dist.barrier()
        if step:
            times.append(time.perf_counter() - began)
    named = list(model.named_parameters()) + list(model.named_buffers())
    result = {
        "base": sum(local_bytes(t) for n, t in named if "lora_" not in n),
        "lora": sum(local_bytes(t) for n, t in named if "lora_" in n),
        "optimizer": sum(local_bytes(v) for state in optimizer.state.values() for v in state.values()
                         if isinstance(v, torch.Tensor)),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "tokens_per_s": setting["batch"] * setting["seq"] / sorted(times)[len(times) // 2],
    }
    if world > 1:
        dist.destroy_process_group()
    return result


# --- the driver ----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_setting(setting: dict, out: Path, timeout: float) -> list[dict] | str:
    """Each rank's measurements, or the error that stopped the setting (a line)."""
    world = setting["world"]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // world)),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world)}
    path = out / "setting.json"
    path.write_text(json.dumps(setting))
    procs = [subprocess.Popen([sys.executable, __file__, "--rank-of", str(path)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for r in range(world)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=timeout)[0].decode(errors="replace"))
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    finally:
        for proc in procs:
            proc.kill()
    results = []
    for log in logs:
        lines = [line for line in log.splitlines() if line.startswith("RESULT ")]
        if not lines:
            errors = [line for line in log.splitlines() if "Error" in line or "error" in line]
            return (errors[-1] if errors else log.strip().splitlines()[-1] if log.strip() else "no output")[:160]
        results.append(json.loads(lines[-1].removeprefix("RESULT ")))
    return results


def report(rows: list[tuple[dict, list[dict] | str]], args) -> str:
    from qlora_inject.bench import machine, markdown_table

    def mib(value: float) -> str:
        return f"{value / 2**20:.1f}"

    table = []
    for setting, results in rows:
        label = [setting["format"], setting["engine"], "ours" if setting["library"] == "qlora_inject" else "PEFT"]
        if isinstance(results, str):
            table.append([*label, "—", "—", "—", "—", "—", f"fails: {results}"])
            continue
        first = results[0]
        table.append([*label, mib(first["base"]), mib(first["lora"]), mib(first["optimizer"]),
                      " / ".join(mib(r["peak_rss"]) for r in results), f"{first['tokens_per_s']:,.0f}", ""])
    return "\n".join([
        f"machine: {machine()}",
        "shared by other jobs while it ran (a loaded machine): compare settings of one run, not across runs",
        f"workload: Llama {args.layers} layers × hidden {args.hidden} (random weights), LoRA r=16 on every linear, "
        f"AdamW, global batch {args.batch} × {args.seq} tokens split over the ranks, median of {args.steps} steps "
        "after a warm-up; per rank (rank 0 shown; peak RSS of each rank)",
        "",
        markdown_table(["format", "engine", "library", "base MiB / rank", "LoRA MiB / rank", "AdamW MiB / rank",
                        "peak RSS MiB (per rank)", "tokens/s (group)", "note"], table),
    ])


def plot(rows: list[tuple[dict, list[dict] | str]], path: Path) -> None:
    from qlora_inject.bench import plot_bars

    done = [(s, r) for s, r in rows if not isinstance(r, str)]
    labels = sorted({f"{s['format']} {s['engine']}" for s, _ in done}, key=lambda x: [
        x.split()[0], list(ENGINES).index(x.split(" ", 1)[1])])
    series = {}
    for library, name in (("qlora_inject", "ours"), ("peft", "PEFT")):
        values = {f"{s['format']} {s['engine']}": r[0]["tokens_per_s"] for s, r in done if s["library"] == library}
        series[name] = [values.get(label, 0.0) for label in labels]
    plot_bars(path, "LoRA training step, world size 2 (CPU, gloo)" if not torch.cuda.is_available()
              else "LoRA training step, world size 2", labels, series, "tokens/s (whole group)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", default="nf4,hqq")
    parser.add_argument("--libraries", default=",".join(LIBRARIES))
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("results"))
    parser.add_argument("--rank-of", type=Path, default=None, help=argparse.SUPPRESS)   # one rank of a setting
    args = parser.parse_args()
    if args.rank_of is not None:
        print("RESULT " + json.dumps(rank_main(json.loads(args.rank_of.read_text()))), flush=True)
        return
    from qlora_inject.bench import save_report

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        build(Path(tmp) / "model", args.hidden, args.layers)
        for fmt in args.formats.split(","):
            for engine, world in ENGINES.items():
                for library in args.libraries.split(","):
                    setting = {"format": fmt, "engine": engine, "world": world, "library": library,
                               "model": str(Path(tmp) / "model"), "batch": args.batch, "seq": args.seq,
                               "steps": args.steps}
                    results = run_setting(setting, Path(tmp), args.timeout)
                    print(fmt, engine, library, results if isinstance(results, str) else results[0], flush=True)
                    rows.append((setting, results))
    text = report(rows, args)
    print(text)
    save_report(args.output, "distributed", text, lambda path: plot(rows, path))


if __name__ == "__main__":
    main()
