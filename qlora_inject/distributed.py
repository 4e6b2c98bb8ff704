"""More than one process: sharding a LoRA model with torch's engines, and what the rest of the library
needs to know about them.

    qlora_inject.shard(lora_model)                 # FSDP2: fully_shard per decoder layer, then the root
    FSDP(lora_model, auto_wrap_policy=qlora_inject.fsdp_wrap_policy(lora_model), use_orig_params=True)
    configure_fsdp_plugin(lora_model, trainer.accelerator.state.fsdp_plugin)   # Trainer / accelerate

Each decoder layer is one FSDP unit holding its LoRA Linears: the fused op reads `lora_A`/`lora_B`
weights without running those modules' forward, so they are gathered with their layer. Where the LoRA
Linears are their own units (PEFT's `fsdp_auto_wrap_policy`, FSDP1 with `use_orig_params=False`), a
layer runs them through their forwards instead (`forward_through_adapter_units`; the base stays fused).
DDP needs nothing from here. The engines also replace parameters (FSDP2 by DTensors, FSDP1 by views of a
flat parameter that require gradients), so "is this base frozen" is read from the parameter objects
this library froze (`remember_base`, `base_trains`), not from whatever tensor holds the weight now.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

_ORIGINALS = "_qlora_inject_base_params"                                  # base module attribute: name -> weakref


def remember_base(base: nn.Module) -> None:
    """Record `base`'s own parameters (bias aside) as the objects LoRA injection freezes.

    An engine may later swap them (FSDP1's `use_orig_params` views, FSDP2's DTensors); `base_trains`
    then still reads the flag the user controls: the one on these objects.
    """
    base.__dict__[_ORIGINALS] = {name: weakref.ref(param) for name, param in base.named_parameters(recurse=False)
                                 if name != "bias"}


def base_trains(base: nn.Module) -> bool:
    """Whether any of `base`'s weights (bias aside) is meant to train.

    Where injection recorded the parameter object and it is still alive (unwrapped, DDP, FSDP1), its own
    `requires_grad` decides, which is what a user flips to train the base; FSDP1's flat-parameter views,
    which require gradients because LoRA shares their flat parameter, do not count. Otherwise (FSDP2 keeps
    `requires_grad` on its DTensors; parameters added later) the tensor's flag decides.
    """
    originals = base.__dict__.get(_ORIGINALS, {})
    for name, tensor in base.named_parameters():
        if name == "bias":
            continue
        ref = originals.get(name)
        original = ref() if ref is not None else None
        if (original if original is not None else tensor).requires_grad:
            return True
    return False


def is_dtensor(tensor: Any) -> bool:
    """True for a `torch.distributed.tensor.DTensor` (checked by name: no import of torch.distributed)."""
    return any(cls.__name__ == "DTensor" for cls in type(tensor).__mro__)


def adapters_are_fsdp_units(layer: nn.Module) -> bool:
    """Whether a LoRA Linear of `layer` is its own FSDP unit (FSDP1 wrapper, FSDP2 `fully_shard`), as PEFT's
    wrap policy makes them: its weight is gathered only while its own forward runs."""
    return any(engine_of(linear) in ("fsdp1", "fsdp2") for table in (layer.lora_A, layer.lora_B)
               for linear in table.values())


def forward_through_adapter_units(layer: nn.Module, x: Tensor) -> Tensor:
    """A LoRA layer's output when its LoRA Linears are their own FSDP units: the base alone (through the
    fused op where it applies), plus each active adapter's `s · lora_B(lora_A(dropout(x)))` run through
    the modules' forwards, where FSDP gathers their weights (and reduce-scatters their gradients).

    Reading their weights directly, as the fused op does, would meet FSDP2's sharded DTensors or FSDP1's
    views of a freed flat parameter. Slower than one decoder-layer unit holding its LoRA (`shard`,
    `fsdp_wrap_policy`), where the adapters join the fused op.
    """
    result = layer.base_output(x)
    if layer.disable_adapters:
        return result
    names = [n for n in layer.active_adapters if n in layer.adapters and n not in layer.merged_adapters]
    unsupported = [n for n in names if not layer.variant(n).fusable]          # a term other than s·B A (DoRA)
    if unsupported or layer.sample_adapters() is not None:
        what = (f"adapter {unsupported[0]!r} ({layer.variant(unsupported[0]).name})" if unsupported
                else "a mixed batch (adapter_names)")
        raise ValueError(
            f"{what} with "
            "LoRA Linears sharded as their own FSDP units (PEFT's wrap policy) is not supported: shard whole "
            "decoder layers with their LoRA inside: qlora_inject.shard(model), or "
            "auto_wrap_policy=qlora_inject.fsdp_wrap_policy(model) with use_orig_params=True for FSDP1"
        )
    for name in names:
        lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
        hidden = lora_A(layer.lora_dropout[name](x.to(lora_A.weight.dtype)))       # (…, r)
        result = result + (lora_B(hidden.to(lora_B.weight.dtype)) * layer.scaling[name]).to(result.dtype)
    return result


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: modules whose class transformers names in
    `_no_split_modules`, else the children of the longest `nn.ModuleList`."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def fsdp_wrap_policy(model: nn.Module) -> Callable:
    """An FSDP1 `auto_wrap_policy` (also accelerate's) with one unit per decoder layer, its LoRA inside.

    Use it with `use_orig_params=True`: a layer's unit holds frozen base weights and trainable LoRA
    weights, which FSDP1 allows only then.
    """
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return ModuleWrapPolicy({type(layer) for layer in _layers_or_raise(model)})


def unshardable_params(model: nn.Module) -> set[nn.Parameter]:
    """Parameters FSDP cannot shard, kept whole on every rank: integer-typed packed weights (HQQ's `W_q`,
    bitsandbytes' int8 weight, which keeps its scales `SCB` on the tensor FSDP would replace).

    GPTQ's and AWQ's packed tensors are buffers, which FSDP never shards, so they are replicated too;
    bitsandbytes 4-bit with a float `quant_storage` shards. For FSDP1 pass them as `ignored_states`.
    """
    return {p for p in model.parameters() if not (p.is_floating_point() or p.is_complex())}


def shard(model: nn.Module, mesh=None, **fsdp_kwargs) -> nn.Module:
    """Shard `model` with FSDP2 (`fully_shard`): each decoder layer with its LoRA Linears, then the root.

    Integer-typed parameters (`unshardable_params`) are left out of sharding (whole on every rank)
    unless `ignored_params` is given.

    Args:
        model: A `LoraModel` (or a model holding LoRA layers), on its device, in a process group.
        mesh: The device mesh; None for all ranks of the default group.
        fsdp_kwargs: Passed to every `fully_shard` call (`reshard_after_forward`, `mp_policy`, ...).

    Returns:
        `model`, sharded in place (as `fully_shard` returns it).
    """
    from torch.distributed.fsdp import fully_shard

    fsdp_kwargs.setdefault("ignored_params", unshardable_params(model) or None)
    for layer in _layers_or_raise(model):
        fully_shard(layer, mesh=mesh, **fsdp_kwargs)
    return fully_shard(model, mesh=mesh, **fsdp_kwargs)


def configure_fsdp_plugin(model: nn.Module, plugin) -> None:
    """Set accelerate's FSDP plugin for `model` as Trainer sets it for PEFT models only: call it after
    `Trainer(...)` (or before `accelerator.prepare`) with `trainer.accelerator.state.fsdp_plugin`.

    One unit per decoder layer with its LoRA inside (`transformer_cls_names_to_wrap`), `use_orig_params`
    for FSDP1 (a unit holds frozen and trainable weights), the modules holding `unshardable_params` as
    `ignored_modules` (kept whole on every rank), and FSDP's mixed precision set to a float bitsandbytes
    4-bit storage dtype other than float32, as Trainer does for PEFT's QLoRA.

    Args:
        model: The `LoraModel` (or a model holding LoRA layers) accelerate will shard.
        plugin: An `accelerate.utils.FullyShardedDataParallelPlugin`; changed in place.
    """
    import functools

    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    layer_types = {type(layer) for layer in _layers_or_raise(model)}
    plugin.transformer_cls_names_to_wrap = sorted(cls.__name__ for cls in layer_types)
    plugin.auto_wrap_policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layer_types)
    if getattr(plugin, "fsdp_version", 1) == 1:
        plugin.use_orig_params = True
    whole = unshardable_params(model)
    if whole:
        plugin.ignored_modules = [m for m in model.modules() if any(p in whole for p in m.parameters(recurse=False))]
    storage = {m.weight.dtype for m in model.modules()
               if type(m).__name__ == "Linear4bit" and m.weight.is_floating_point()}
    if len(storage) == 1 and (dtype := storage.pop()) != torch.float32:
        plugin.set_mixed_precision(dtype, override=True)


def _layers_or_raise(model: nn.Module) -> list[nn.Module]:
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(
            f"found no decoder layers in {type(model).__name__} (no transformers `_no_split_modules`, no "
            "nn.ModuleList); shard it by hand: fully_shard each block holding LoRA layers, then the root"
        )
    return layers


# --- processes ------------------------------------------------------------------------------------

def world_size() -> int:
    """Processes in the default group (1 when torch.distributed is not initialized)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 of the default group, or without one."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank, where a process group is initialized."""
    if world_size() > 1:
        torch.distributed.barrier()


def engine_of(model: nn.Module) -> str | None:
    """"ddp", "fsdp1", "fsdp2" for a model those engines wrap or shard (the wrapper itself, or an FSDP2
    root), else None."""
    names = {cls.__name__ for cls in type(model).__mro__}
    if "DistributedDataParallel" in names:
        return "ddp"
    if "FullyShardedDataParallel" in names:
        return "fsdp1"
    if "FSDPModule" in names:
        return "fsdp2"
    return None


def is_sharded(model: nn.Module) -> bool:
    """Whether any module inside `model` is an FSDP1 or FSDP2 unit."""
    return any(engine_of(m) in ("fsdp1", "fsdp2") for m in model.modules())


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def launched_world_size() -> int:
    """The group's world size, or before joining it the one a launcher set (`torchrun`, `accelerate
    launch`: the WORLD_SIZE variable), else 1."""
    return world_size() if _initialized() else _environment_number("WORLD_SIZE", 1)


def launched_rank() -> int:
    """This process's rank in the group, or before joining it the one a launcher set (RANK), else 0."""
    return rank() if _initialized() else _environment_number("RANK", 0)


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _environment_number(name: str, default: int) -> int:
    import os

    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"the environment variable {name}={value!r} is not a number; launch with "
                         "torchrun or accelerate launch, which set it") from None


def join_launched_group() -> bool:
    """Join the process group a launcher describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT variables).

    gloo serves CPU tensors, nccl CUDA ones (each process on the GPU LOCAL_RANK names). Returns True when
    this call initialized the group (the caller then destroys it), False when there is nothing to join
    (one process) or the group already exists.
    """
    dist = torch.distributed
    if launched_world_size() <= 1 or _initialized():
        return False
    if not dist.is_available():
        raise RuntimeError(f"launched as {launched_world_size()} processes, but this torch build has no "
                           "torch.distributed; install a torch with it, or run one process")
    use_local_gpu()
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return True


def use_local_gpu() -> None:
    """Make the GPU the launcher's LOCAL_RANK names this process's current device (no-op without CUDA)."""
    if torch.cuda.is_available():
        local, count = _environment_number("LOCAL_RANK", 0), torch.cuda.device_count()
        if local >= count:
            raise RuntimeError(f"LOCAL_RANK {local} names no GPU: this machine has {count}; launch at most "
                               f"{count} processes per node (--nproc_per_node {count}), or hide the GPUs "
                               "(CUDA_VISIBLE_DEVICES=) to train on the CPU with gloo")
        torch.cuda.set_device(local)


def all_reduce_sum(value: float) -> float:
    """The sum of `value` over every rank (`value` itself with one process); every rank must call it."""
    if world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(tensor)
    return float(tensor.item())


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on any (so that all ranks take the same branch)."""
    return all_reduce_sum(float(flag)) > 0


def all_gather_tensor(tensor: Tensor) -> list[Tensor]:
    """Every rank's `tensor` (same shape and dtype on all ranks), in rank order; `[tensor]` with one process."""
    if world_size() == 1:
        return [tensor]
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    torch.distributed.all_gather(parts, tensor)
    return parts


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After loading full tensors into an optimizer of FSDP2-sharded parameters: shard each state tensor
    as its parameter is (every rank must call it; each holds the same full tensors)."""
    from torch.distributed.tensor import distribute_tensor

    for param, values in optimizer.state.items():
        if not is_dtensor(param):
            continue
        for name, value in values.items():
            if isinstance(value, Tensor) and not is_dtensor(value) and value.shape == param.shape:
                values[name] = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)


def gather_full(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` with every DTensor gathered to a full CPU tensor; every rank must call it, in the same order."""
    return {key: (value.full_tensor() if is_dtensor(value) else value).detach().cpu() for key, value in state.items()}


__all__ = ["adapters_are_fsdp_units", "all_gather_tensor", "all_reduce_sum", "any_rank", "barrier", "base_trains",
           "configure_fsdp_plugin", "decoder_layers", "engine_of", "forward_through_adapter_units",
           "fsdp_wrap_policy", "gather_full", "is_dtensor", "is_main_process", "is_sharded", "join_launched_group",
           "launched_rank", "launched_world_size", "rank", "remember_base", "shard", "shard_optimizer_state",
           "unshardable_params", "use_local_gpu", "world_size"]
