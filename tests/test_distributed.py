"""DDP, FSDP2 and FSDP1 on two CPU processes (gloo, localhost): the same adapter as one process, the fused
op in use, the base untouched, the adapter written once, and clear errors where a setup cannot work.

One pair of processes (tests/distributed_worker.py, started by `accelerate launch`) runs every scenario, so the
imports are paid once; `qlora-inject train` runs under torchrun.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import requires
from factories import tiny_llama_dir

pytestmark = [requires("bitsandbytes"), requires("hqq"),
              pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed (gloo)")]

FORMATS = ["nf4", "int8", "hqq", "gptq", "awq"]
# fsdp1: qi.fsdp_wrap_policy with use_orig_params=True; fsdp1peft: PEFT's recipe (its fsdp_auto_wrap_policy, each
# LoRA Linear its own unit, use_orig_params=False), on every format. fsdp2lora: each LoRA Linear fully_shard-ed
# on its own, then qi.shard.
TRAINED = ([f"{engine}-{quant}" for engine in ("ddp", "fsdp2", "fsdp1", "fsdp1peft") for quant in FORMATS]
           + ["fsdp2lora-nf4"])
ADAPTERS_ALONE = ("fsdp1peft", "fsdp2lora")                           # LoRA Linears as their own FSDP units
SCENARIOS = [*TRAINED, "trainer-nf4"]
WORLD = 2
# AWQ: the layers without LoRA run GPTQModel's own AwqTorchLinear forward, which computes in fp16, so the sums
# over 4 rows (one process) and 2 + 2 rows (two ranks) round apart (2.1e-5 on these weights, in one process too).
TOLERANCE = {"awq": 5e-5}
# accelerate starts several processes on one machine only through torchrun, which it does for MULTI_GPU
# (`use_cpu`/`--cpu` starts one process, or needs mpirun); ACCELERATE_USE_CPU=true in the environment then makes
# each process MULTI_CPU over gloo. FSDP through accelerate is GPU-only: its state turns FSDP on for the GPU-like
# distributed types and never for MULTI_CPU, so the FSDP scenarios apply the engines directly.
ACCELERATE_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: 1
num_processes: {world}
machine_rank: 0
main_process_ip: 127.0.0.1
main_process_port: {port}
mixed_precision: 'no'
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, list[dict]]:
    """Every scenario in one pair of processes started by `accelerate launch` (on the CPU, gloo)."""
    pytest.importorskip("accelerate")
    out = tmp_path_factory.mktemp("distributed")
    config = out / "accelerate.yaml"
    config.write_text(ACCELERATE_CONFIG.format(world=WORLD, port=_free_port()))
    worker = Path(__file__).with_name("distributed_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path),
           "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                             str(worker), str(out), str(tiny_llama_dir()), ",".join(SCENARIOS)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        log = proc.communicate(timeout=300)[0].decode(errors="replace")   # never hangs the suite
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)                                          # the launcher and its ranks
    assert proc.returncode == 0, log[-3000:]
    return out, [json.loads((out / f"results-rank{r}.json").read_text()) for r in range(WORLD)]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


@pytest.mark.parametrize("scenario", TRAINED)
def test_trains_the_adapter_one_process_would_on_the_whole_batch(runs, scenario):
    out, results = runs
    for result in results:
        assert "error" not in result[scenario], result[scenario].get("trace", result[scenario]["error"])
    ranks = [_tensors(out / f"{scenario}-rank{r}.safetensors") for r in range(WORLD)]
    assert ranks[0] and all(ranks[0].keys() == other.keys() for other in ranks)
    for other in ranks[1:]:                                                 # identical across ranks
        for key, value in ranks[0].items():
            assert torch.equal(value, other[key]), key
    quant = scenario.split("-")[1]
    saved = _tensors(out / f"{scenario}-adapter" / "adapter_model.safetensors")
    single = _tensors(out / f"single-{quant}-adapter" / "adapter_model.safetensors")
    assert saved.keys() == single.keys() and len(saved) == 2 * 3 * 2      # lora_A/B × 3 targets × 2 layers
    tolerance = TOLERANCE.get(quant, 1e-5)
    moved = 0.0
    for key, value in single.items():
        torch.testing.assert_close(saved[key], value, atol=tolerance, rtol=0)
        moved = max(moved, (value - ranks[0][key.replace("base_model.model.", "model.")
                                              .replace(".weight", ".default.weight")]).abs().max().item())
        if ".lora_B." in key:
            assert value.abs().max() > 1e-4, key                            # it trained
    assert moved <= tolerance                                               # the ranks' own copies agree too


@pytest.mark.parametrize("scenario", TRAINED)
def test_uses_the_fused_op_keeps_the_base_and_saves_once(runs, scenario):
    _, results = runs
    for rank, result in enumerate(results):
        result = result[scenario]
        assert result["fused_calls"] >= 6 * 2, result                     # 6 LoRA layers × forward per step
        if scenario.startswith(ADAPTERS_ALONE):                             # the base fused, LoRA through its units
            assert result["fused_with_lora"] == 0, result
        else:
            assert result["fused_with_lora"] == result["fused_calls"], result
        assert result["base_checked"] > 0 and result["base_changed"] == []
        assert result["saves"] == (1 if rank == 0 else 0)


def test_causal_lm_loss_refuses_the_inner_module_of_a_ddp_model(runs):
    _, results = runs
    for result in results:
        assert "would not synchronize" in result["ddp-nf4"]["inner_refused"]
        assert "Pass the wrapper itself" in result["ddp-nf4"]["inner_refused"]


def test_trainer_under_accelerate_launch_saves_the_adapter_from_rank_0_once(runs):
    out, results = runs
    for rank, result in enumerate(results):
        result = result["trainer-nf4"]
        assert "error" not in result, result["error"]
        assert result["parallel_mode"] == "ParallelMode.DISTRIBUTED" and result["world_size"] == WORLD
        assert result["distributed_type"] == "DistributedType.MULTI_CPU"
        assert result["saves"] == (1 if rank == 0 else 0)                     # SaveAdapterCallback on every rank
    ranks = [_tensors(out / f"trainer-rank{r}.safetensors") for r in range(WORLD)]
    saved = _tensors(out / "trainer" / "checkpoint-2" / "adapter_model.safetensors")
    assert len(saved) == len(ranks[0]) == 2 * 3 * 2
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]), key                        # DDP kept the ranks together
        peft_key = "base_model." + key.replace(".default.weight", ".weight")
        assert torch.equal(saved[peft_key], value), key


def test_base_frozen_is_read_from_the_parameters_injection_froze():
    from torch import nn

    from qlora_inject import LoraConfig, inject
    from qlora_inject.distributed import base_trains

    from factories import Holder, make_dense

    model = Holder(make_dense())
    inject(model, LoraConfig(r=2, target_modules=["proj"]))
    base = model.proj.base_layer
    original = base.weight
    assert not base_trains(base)
    base._parameters["weight"] = original.detach().clone().requires_grad_(True)  # FSDP1's view: needs grad
    assert not base_trains(base)                                            # ... but injection froze the weight
    original.requires_grad_(True)                                           # the user unfreezes it
    assert base_trains(base)
    base._parameters["weight"] = nn.Parameter(original.detach().clone())    # a new trainable weight, no record
    del original
    assert base_trains(base)


def _as_fsdp_units(layer) -> None:
    """Make `layer`'s LoRA Linears look like FSDP2 units (`engine_of` reads the class names), with no group."""
    from torch import nn

    class FSDPModule(nn.Module):                                            # the name FSDP2 gives its units
        pass

    unit = type("FSDPLinear", (FSDPModule, nn.Linear), {})
    for table in (layer.lora_A, layer.lora_B):
        for linear in table.values():
            linear.__class__ = unit


def test_lora_linears_as_their_own_fsdp_units_run_through_their_forwards_with_the_same_result():
    from qlora_inject import LoraConfig, inject

    from factories import Holder, make_bnb4

    model = Holder(make_bnb4())
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    layer = model.proj
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    x = torch.randn(3, 5, layer.in_features)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    fused = model(x)
    fused_grads = torch.autograd.grad(fused.square().sum(), params)
    _as_fsdp_units(layer)                                                   # PEFT's wrap policy
    alone = model(x)
    alone_grads = torch.autograd.grad(alone.square().sum(), params)
    torch.testing.assert_close(alone, fused, atol=1e-5, rtol=1e-5)
    for got, expected in zip(alone_grads, fused_grads, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_dora_with_lora_linears_as_their_own_fsdp_units_is_refused_naming_the_fix():
    from qlora_inject import LoraConfig, inject

    from factories import Holder, make_bnb4

    model = Holder(make_bnb4())
    inject(model, LoraConfig(r=4, target_modules=["proj"], use_dora=True))
    _as_fsdp_units(model.proj)
    with pytest.raises(ValueError, match=r"adapter 'default' \(dora\) with LoRA Linears sharded as their own FSDP "
                                         r"units .*qlora_inject.shard\(model\)"):
        model(torch.randn(2, model.proj.in_features))


def _unit_names(plugin, model) -> list[str]:
    """The modules accelerate makes FSDP units of, through its own policy code for the plugin's version."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    if plugin.fsdp_version == 2:
        policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    else:
        def policy(module):
            return plugin.auto_wrap_policy(module=module, recurse=False, nonwrapped_numel=0)
    return [name for name, module in model.named_modules() if policy(module)]


@pytest.mark.parametrize("fsdp_version", [1, 2])
def test_accelerate_transformer_based_wrap_makes_one_unit_per_decoder_layer_with_its_lora(fsdp_version):
    pytest.importorskip("accelerate")
    from accelerate.utils import FullyShardedDataParallelPlugin

    import qlora_inject as qi

    from factories import load_tiny_llama

    model = qi.LoraModel(load_tiny_llama("nf4"), qi.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    plugin = FullyShardedDataParallelPlugin(fsdp_version=fsdp_version, auto_wrap_policy="transformer_based_wrap")
    plugin.set_auto_wrap_policy(model)                                      # reads the LoraModel's _no_split_modules
    assert _unit_names(plugin, model) == ["model.model.layers.0", "model.model.layers.1"]   # LoRA inside


@pytest.mark.parametrize("fsdp_version", [1, 2])
def test_configure_fsdp_plugin_gives_accelerate_what_trainer_gives_peft_models(fsdp_version):
    pytest.importorskip("accelerate")
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    import qlora_inject as qi
    from qlora_inject.backends.bnb import never_repack
    from qlora_inject.distributed import configure_fsdp_plugin

    from factories import load_tiny_llama

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                                bnb_4bit_quant_storage=torch.bfloat16)
    nf4 = never_repack(LlamaForCausalLM.from_pretrained(tiny_llama_dir(), quantization_config=config,
                                                        device_map="cpu"))
    lora = qi.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    model = qi.LoraModel(nf4, lora)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=fsdp_version, use_orig_params=False)   # size-based default
    configure_fsdp_plugin(model, plugin)
    assert _unit_names(plugin, model) == ["model.model.layers.0", "model.model.layers.1"]
    assert fsdp_version == 2 or plugin.use_orig_params is True             # FSDP1: frozen and trainable in a unit
    precision = plugin.mixed_precision_policy                               # the float storage's dtype, as for PEFT
    assert precision.param_dtype == torch.bfloat16 and not plugin.ignored_modules
    hqq = qi.LoraModel(load_tiny_llama("hqq"), lora)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=fsdp_version)
    configure_fsdp_plugin(hqq, plugin)
    assert {type(m).__name__ for m in plugin.ignored_modules} == {"HQQLinear"}   # W_q kept whole on every rank


# --- qlora-inject train under torchrun ------------------------------------------------------------

TRAIN = ["train", "--model", "tiny", "--steps", "3", "--batch-size", "4", "--seq-len", "32", "--rank", "4",
         "--target-modules", "q_proj,v_proj", "--lora-dropout", "0", "--save-every", "2", "--no-progress"]
ENGINES = ("ddp", "fsdp")                                            # the worker runs both


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> Path:
    """`qlora-inject train` under `torchrun --nproc_per_node 2` (DDP, then FSDP2, in the same two processes)
    and, meanwhile, in this process."""
    from qlora_inject.cli import main

    out = tmp_path_factory.mktemp("torchrun")
    for engine in ENGINES:
        (out / engine).mkdir()
    worker = Path(__file__).with_name("distributed_worker.py")
    if 0 < torch.cuda.device_count() < WORLD:
        pytest.skip(f"one process here would train on the GPU, {WORLD} ranks on the CPU: needs {WORLD} GPUs or none")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
                             "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(worker), "cli",
                             str(out), *TRAIN], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert main([*TRAIN, "--output", str(out / "single")]) == 0
        log = proc.communicate(timeout=240)[0].decode(errors="replace")      # never hangs the suite
    finally:
        proc.kill()
    (out / "log.txt").write_text(log)
    for engine, part in zip(ENGINES, log.split("=== ")[1:], strict=False):   # each engine's test checks its own
        (out / engine / "log.txt").write_text(part)
    return out


def _finished(cli_runs: Path, engine: str) -> Path:
    """The engine's output folder, after checking its run wrote the adapter (else the log's tail)."""
    run = cli_runs / engine / "run"
    assert (run / "adapter_model.safetensors").is_file(), (cli_runs / "log.txt").read_text()[-3000:]
    return run


@pytest.mark.parametrize("engine", ENGINES)
def test_train_under_torchrun_gives_the_one_process_adapter_and_losses(cli_runs, engine):
    run, single = _finished(cli_runs, engine), cli_runs / "single"
    saved, alone = (_tensors(d / "adapter_model.safetensors") for d in (run, single))
    assert saved.keys() == alone.keys() and len(saved) == 2 * 2 * 4             # lora_A/B × q,v × 4 layers
    for key, value in alone.items():
        torch.testing.assert_close(saved[key], value, atol=1e-5, rtol=0)
    losses, alone_losses = (json.loads((d / "losses.json").read_text()) for d in (run, single))
    assert len(losses) == 3
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(alone_losses), atol=1e-5, rtol=0)
    state = json.loads((run / "checkpoint" / "trainer_state.json").read_text())
    assert state["settings"]["world_size"] == WORLD and state["step"] == 3


@pytest.mark.parametrize("engine", ENGINES)
def test_train_under_torchrun_writes_from_rank_0_only(cli_runs, engine):
    _finished(cli_runs, engine)
    writes = (cli_runs / engine / "writes-rank0.txt").read_text().splitlines()
    assert len(writes) == 3, writes                                           # checkpoints at steps 2 and 3, adapter
    assert sum("trainer_state.json" in line for line in writes) == 2
    assert not (cli_runs / engine / "writes-rank1.txt").exists()
    assert (cli_runs / engine / "log.txt").read_text().count("adapter in") == 1


def test_resume_with_another_world_size_is_refused_naming_both(cli_runs):
    from qlora_inject.train import TrainOptions, UsageError, train

    options = TrainOptions(model="tiny", steps=4, batch_size=4, seq_len=32, r=4, target_modules="q_proj,v_proj",
                           lora_dropout=0.0, save_every=2, progress=False, output=_finished(cli_runs, "ddp"),
                           resume=True)
    with pytest.raises(UsageError, match=r"written by 2 process\(es\), this run has 1.*--nproc_per_node 2"):
        train(options, log=lambda _: None)


def _peft_loads(peft_model, adapter: Path, name: str) -> None:
    """Load `adapter` into `peft_model` as `name`, and check PEFT holds exactly the saved tensors."""
    peft_model.load_adapter(adapter, adapter_name=name)
    suffix = f".{name}.weight"
    loaded = {k.replace(suffix, ".weight"): v for k, v in peft_model.state_dict().items() if k.endswith(suffix)}
    saved = _tensors(adapter / "adapter_model.safetensors")
    assert saved and loaded.keys() == saved.keys(), adapter
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), (adapter, key)


@pytest.mark.parametrize("engine", ENGINES)
def test_adapters_saved_by_train_under_torchrun_load_in_peft(cli_runs, tmp_path, engine):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from qlora_inject.train import build_default_model

    adapter = _finished(cli_runs, engine)
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(build_default_model(tmp_path / "tiny")),
                                           adapter)
    _peft_loads(peft_model, adapter, "again")


def test_adapters_saved_under_every_engine_and_format_load_in_peft(runs):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    out = runs[0]
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_llama_dir()),
                                           out / f"{TRAINED[0]}-adapter")
    for scenario in TRAINED:
        _peft_loads(peft_model, out / f"{scenario}-adapter", scenario.replace("-", "_"))


def test_a_checkpoint_from_before_world_size_was_recorded_resumes_in_one_process():
    from qlora_inject.checkpoint import TrainerState
    from qlora_inject.train import TrainOptions, UsageError, check_resume, run_settings

    options = TrainOptions(model="tiny", steps=4)
    settings = run_settings(options, "text")
    older = {k: v for k, v in settings.items() if k not in ("world_size", "lora_dropout")}   # 1 process, 0.05
    check_resume(options, settings, TrainerState(2, [1.0, 1.0], older, {}, {}))
    with pytest.raises(UsageError, match=r"written by 1 process\(es\), this run has 2"):
        check_resume(options, run_settings(options, "text", world=2), TrainerState(2, [1.0, 1.0], older, {}, {}))


def test_train_refuses_settings_that_cannot_run_over_processes():
    from qlora_inject.train import TrainOptions, UsageError, _check_world

    with pytest.raises(UsageError, match="--fsdp shards over several processes, and this is one"):
        _check_world(TrainOptions(fsdp=True), 1)
    with pytest.raises(UsageError, match="--batch-size 5 does not split over 2 processes; give a multiple of 2"):
        _check_world(TrainOptions(batch_size=5), 2)
    _check_world(TrainOptions(batch_size=4), 2)
    _check_world(TrainOptions(fsdp=True, quant="int8"), 2)           # int8 weights replicated, as in fsdp2-int8
