"""One rank of tests/test_distributed.py: trains a tiny quantized Llama's LoRA under each engine.

    accelerate launch ... distributed_worker.py OUT TINY_LLAMA_DIR SCENARIO[,SCENARIO...]   (or torchrun)
    torchrun ... distributed_worker.py cli OUT train ...    (qlora-inject under DDP, then FSDP2; writes recorded)

A scenario is `engine-format`. Engines: ddp; fsdp2 (`qi.shard`); fsdp1 (`qi.fsdp_wrap_policy`,
`use_orig_params=True`); and PEFT's policy, each LoRA Linear its own unit: fsdp2lora (`fully_shard` on each,
then `qi.shard`), fsdp1peft (PEFT's documented recipe: its `fsdp_auto_wrap_policy`, `use_orig_params=False`).
Each format is loaded once; every scenario trains a copy. Before joining the group every rank trains the
same model alone on the whole batch (the reference); then each rank trains on its half. Written to OUT:
each rank's gathered adapter and base after training (safetensors), rank 0's single-process adapter, and
per rank a JSON of fused-op calls, adapter saves, errors and seconds per scenario.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

STEPS, LR, BATCH, SEQ = 2, 0.5, 4, 12
TARGETS = ["q_proj", "v_proj", "down_proj"]


def load(quant: str, directory: str):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    from qlora_inject.backends.bnb import never_repack

    if quant != "nf4":
        from qlora_inject.quantize import quantize_model

        return quantize_model(LlamaForCausalLM.from_pretrained(directory), quant, group_size=32)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
    return never_repack(LlamaForCausalLM.from_pretrained(directory, quantization_config=config, device_map="cpu"))


_LOADED: dict = {}


def lora_model(quant: str, directory: str):
    """A fresh LoRA model (seed 0) on a copy of the format's base, loaded once per process."""
    import copy

    import qlora_inject as qi

    if quant not in _LOADED:
        _LOADED[quant] = load(quant, directory)
    torch.manual_seed(0)
    return qi.LoraModel(copy.deepcopy(_LOADED[quant]), qi.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))


def batch() -> torch.Tensor:
    return torch.randint(0, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def train(model, wrapper, ids: torch.Tensor) -> None:
    import qlora_inject as qi

    optimizer = torch.optim.SGD([p for p in wrapper.parameters() if p.requires_grad], lr=LR)
    for _ in range(STEPS):
        qi.causal_lm_loss(wrapper, ids).backward()
        optimizer.step()
        optimizer.zero_grad()


def wrap(engine: str, model):
    import qlora_inject as qi
    from qlora_inject.distributed import unshardable_params

    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    if engine == "fsdp2":
        return qi.shard(model)
    if engine == "fsdp2lora":                                               # PEFT's policy: LoRA Linears alone too
        from torch.distributed.fsdp import fully_shard

        for name, module in model.named_modules():
            if name.rsplit(".", 2)[-2:-1] in (["lora_A"], ["lora_B"]):
                fully_shard(module)
        return qi.shard(model)
    from torch.distributed.fsdp import FullyShardedDataParallel

    if engine == "fsdp1peft":                                               # PEFT's documented recipe
        from peft.utils.other import fsdp_auto_wrap_policy

        return FullyShardedDataParallel(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=False,
                                        ignored_states=list(unshardable_params(model)),
                                        device_id=torch.device("cpu"))
    return FullyShardedDataParallel(model, auto_wrap_policy=qi.fsdp_wrap_policy(model), use_orig_params=True,
                                    ignored_states=list(unshardable_params(model)), device_id=torch.device("cpu"))


def full_state(engine: str, model, wrapper) -> dict[str, torch.Tensor]:
    from qlora_inject.distributed import gather_full

    state = wrapper.state_dict() if engine.startswith("fsdp1") else model.state_dict()   # FSDP1: full via its hooks
    return {k.removeprefix("module."): v for k, v in gather_full(state).items()}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality (packed 4-bit codes stored as float32 include NaN patterns, which `equal` calls unequal)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))


def run(scenario: str, rank: int, out: Path, directory: str, calls: list, saves: list) -> dict:
    import qlora_inject as qi

    engine, quant = scenario.split("-")
    model = lora_model(quant, directory)
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    ids = batch()[rank * BATCH // 2:(rank + 1) * BATCH // 2]
    calls.clear()
    saves.clear()
    start = time.perf_counter()
    wrapper = wrap(engine, model)
    try:
        train(model, wrapper, ids)
    except RuntimeError as err:
        return {"error": str(err), "trace": traceback.format_exc()}
    after = full_state(engine, model, wrapper)
    from safetensors.torch import save_file

    lora = {k: v for k, v in after.items() if "lora_" in k}
    base_changed = sorted(k for k, v in before.items() if k in after and not same_bits(v, after[k]))
    save_file({k: v.contiguous() for k, v in lora.items()}, out / f"{scenario}-rank{rank}.safetensors")
    model.save_pretrained(out / f"{scenario}-adapter")
    result = {"fused_calls": len(calls), "fused_with_lora": sum(n > 0 for n in calls), "saves": len(saves),
              "base_changed": base_changed, "base_checked": sum(k in after for k in before),
              "seconds": round(time.perf_counter() - start, 2)}
    if engine == "ddp":                                                     # the inner module trains apart: refused
        try:
            qi.causal_lm_loss(model, ids)
        except RuntimeError as err:
            result["inner_refused"] = str(err)
    return result


def run_trainer(rank: int, out: Path, directory: str, saves: list) -> dict:
    """transformers' Trainer under `accelerate launch` (DDP over gloo) with SaveAdapterCallback, saving at step 2."""
    from safetensors.torch import save_file
    from transformers import Trainer, TrainingArguments

    from qlora_inject.integrations import SaveAdapterCallback

    model = lora_model("nf4", directory)
    rows = [{"input_ids": row, "labels": row} for row in batch().tolist()]
    arguments = TrainingArguments(output_dir=str(out / "trainer"), max_steps=2, per_device_train_batch_size=1,
                                  learning_rate=LR, optim="sgd", save_strategy="steps", save_steps=2, report_to=[],
                                  use_cpu=True, remove_unused_columns=False, save_only_model=True)
    trainer = Trainer(model=model, args=arguments, train_dataset=rows, callbacks=[SaveAdapterCallback()],
                      data_collator=lambda rows: {k: torch.tensor([r[k] for r in rows]) for k in rows[0]})
    saves.clear()
    trainer.train()
    lora = {k: v.detach().contiguous() for k, v in model.state_dict().items() if "lora_" in k}
    save_file(lora, out / f"trainer-rank{rank}.safetensors")
    return {"saves": len(saves), "parallel_mode": str(arguments.parallel_mode), "world_size": arguments.world_size,
            "distributed_type": str(trainer.accelerator.state.distributed_type)}


def cli(out: Path, argv: list[str]) -> None:
    """`qlora-inject ARGV --output OUT/<engine>/run` as one rank under torchrun, for DDP then FSDP2 (`--fsdp`)
    in the same processes, recording each folder it writes (checkpoint, adapter) in
    OUT/<engine>/writes-rank<RANK>.txt."""
    import os

    import qlora_inject.adapter_io as adapter_io
    from qlora_inject.cli import main as qlora_inject

    write = adapter_io.write_files
    for engine, flags in (("ddp", []), ("fsdp", ["--fsdp"])):
        record = out / engine / f"writes-rank{os.environ['RANK']}.txt"

        def counted(directory, files, record=record):
            with record.open("a") as handle:
                handle.write(f"{sorted(files)}\n")
            return write(directory, files)

        adapter_io.write_files = counted
        if os.environ["RANK"] == "0":
            print(f"=== {engine}", flush=True)                              # the test splits the log here
        if engine == "fsdp":                                                # a group made before (as accelerate
            _join_fresh_group()                                             # does), which train keeps
        if qlora_inject([*argv, *flags, "--output", str(out / engine / "run")]) != 0:
            sys.exit(1)
    dist.destroy_process_group()


def _join_fresh_group() -> None:
    """The launcher's group again, under fresh store keys (the first run's group, destroyed, left its own)."""
    import os

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    dist.init_process_group("gloo", store=dist.PrefixStore("second-run", store), rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]))


def main() -> None:
    if sys.argv[1] == "cli":
        return cli(Path(sys.argv[2]), sys.argv[3:])
    import os

    out, directory, scenarios = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(",")
    rank = int(os.environ["RANK"])                                          # set by the launcher
    import qlora_inject.adapter_io as adapter_io
    import qlora_inject.lora as lora

    calls: list = []
    saves: list = []
    fused, save = lora.fused_lora_linear, adapter_io.save_adapter
    lora.fused_lora_linear = lambda *a, **k: calls.append(len(a[4])) or fused(*a, **k)    # adapters fused in
    adapter_io.save_adapter = lambda *a, **k: saves.append(1) or save(*a, **k)

    for quant in sorted({s.split("-")[1] for s in scenarios if not s.startswith("trainer")}):   # one process
        model = lora_model(quant, directory)
        train(model, model, batch())
        if rank == 0:
            model.save_pretrained(out / f"single-{quant}-adapter")

    dist.init_process_group("gloo")                                          # the launcher's RANK, WORLD_SIZE, ...
    results = {}
    for scenario in scenarios:
        try:
            results[scenario] = (run_trainer(rank, out, directory, saves) if scenario == "trainer-nf4"
                                 else run(scenario, rank, out, directory, calls, saves))
        except Exception:                                                   # noqa: BLE001 - reported to the test
            results[scenario] = {"error": traceback.format_exc()}
        dist.barrier()
    (out / f"results-rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
