"""`LoraModel`: the PEFT-familiar facade over `inject`.

    model = LoraModel(model, LoraConfig(r=16, target_modules=[...]), "default")

`LoraModel.model` is the wrapped model (modified in place); attribute lookups fall through to it,
so `model.config`, `model.generate` and friends work as on the original.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from qlora_inject import adapter_io, distributed
from qlora_inject.combine import add_weighted_adapter
from qlora_inject.config import LoraConfig
from qlora_inject.fused_ops import unfuse_llama_ops
from qlora_inject.inject import (
    InjectionReport,
    adapter_names,
    delete_adapter,
    inject,
    set_active_adapters,
)
from qlora_inject.lora import BASE_ADAPTER, LoraLinear, MergeResult
from qlora_inject.merge import merge, merge_and_unload, unmerge
from qlora_inject.mixed_batch import assign_adapters
from qlora_inject.modules_to_save import ModulesToSaveWrapper


class LoraModel(nn.Module):
    """A model with LoRA adapters injected into its (possibly quantized) layers.

    Args:
        model: The model to adapt; changed in place and kept as `self.model`.
        config: The adapter's `LoraConfig`.
        adapter_name: Name of the first adapter.
    """

    prefix = "lora_"
    # transformers' Trainer refuses to fine-tune a quantized model unless it sees adapters attached;
    # this is the flag it reads (its own PEFT integration sets it on models it gives adapters to).
    _hf_peft_config_loaded = True

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> None:
        super().__init__()
        _refuse_adapted(model, adapter_name)
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self.reports: dict[str, InjectionReport] = {}
        self.add_adapter(adapter_name, config)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """Run the model; `adapter_names` (one per sample, `"__base__"` for none) mixes adapters in a batch."""
        if adapter_names is None:
            return self.model(*args, **kwargs)
        with self.mixed_batch(adapter_names):
            return self.model(*args, **kwargs)

    @contextmanager
    def mixed_batch(self, adapter_names: list[str]) -> Iterator[None]:
        """Inside it, sample i of every batch uses adapter `adapter_names[i]` (`"__base__"`: none), in this
        thread or asyncio task only: concurrent calls with other names do not see it."""
        unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER and n not in self.peft_config})
        if unknown:
            raise ValueError(f"adapter_names names {unknown}, which do not exist; adapters: "
                             f"{list(self.peft_config)} (or {BASE_ADAPTER!r} for the base alone)")
        wrappers = [m for m in self.model.modules() if isinstance(m, (LoraLinear, ModulesToSaveWrapper))]
        with assign_adapters(wrappers, adapter_names):                  # this call's (thread's, task's) only
            yield

    def get_base_model(self) -> nn.Module:
        """The wrapped model (with its LoRA layers in place)."""
        return self.model

    # --- adapters -------------------------------------------------------------------------------

    def add_adapter(self, adapter_name: str, config: LoraConfig) -> InjectionReport:
        """Inject another adapter; the active adapters stay as they are (the first becomes active)."""
        report = inject(self.model, config, adapter_name)
        self.peft_config[adapter_name] = config
        self.reports[adapter_name] = report
        return report

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None) -> None:
        """Add `adapter_name` = Σ weights[i]·adapters[i] (`"linear"`, `"cat"` or `"svd"`; see `combine`)."""
        self.peft_config[adapter_name] = add_weighted_adapter(self.model, adapters, weights, adapter_name,
                                                              combination_type, svd_rank)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; layers left without adapters get their original base module back. A merged
        adapter is unmerged first (adapters that stay merged are merged again into the original base)."""
        delete_adapter(self.model, adapter_name)
        self.peft_config.pop(adapter_name, None)
        self.reports.pop(adapter_name, None)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Activate one adapter, or several (their outputs add up); the others stop training."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"adapter(s) {unknown} do not exist; adapters: {list(self.peft_config)}")
        set_active_adapters(self.model, names)

    @property
    def active_adapters(self) -> list[str]:
        for module in self.model.modules():
            if isinstance(module, (LoraLinear, ModulesToSaveWrapper)):
                return list(module.active_adapters)
        return []

    @property
    def active_adapter(self) -> str | list[str]:
        active = self.active_adapters
        return active[0] if len(active) == 1 else active

    def _set_adapters_disabled(self, disabled: bool) -> None:
        for module in self.model.modules():
            if isinstance(module, (LoraLinear, ModulesToSaveWrapper)):
                module.disable_adapters = disabled

    def enable_adapter_layers(self) -> None:
        self._set_adapters_disabled(False)

    def disable_adapter_layers(self) -> None:
        self._set_adapters_disabled(True)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager: inside it the model computes as the base model alone."""
        self.disable_adapter_layers()
        try:
            yield
        finally:
            self.enable_adapter_layers()

    # --- merging --------------------------------------------------------------------------------

    def merge_adapter(self, adapter_names: list[str] | None = None,
                      held_out: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict[str, MergeResult]:
        """Merge the active adapters into the bases in their own formats; returns each layer's merge error.

        With `held_out` (`(input_ids, labels)` batches) the result's `gain` is the held-out loss of the base,
        the adapter and the merged model, and a `MergeLossWarning` (one line, pointing to
        `merge_and_unload(dequantize=True)`) says when the merge keeps less than half of the gain.
        """
        if held_out is not None:
            from qlora_inject.merge_report import merge_measured

            return merge_measured(self, held_out, adapter_names)
        return merge(self.model, adapter_names)

    def unmerge_adapter(self) -> None:
        """Restore the original quantized bases exactly."""
        unmerge(self.model)

    def merge_and_unload(self, dequantize: bool = False, dtype: torch.dtype | None = None,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """The model with adapters merged and LoRA layers removed (quantized, or dense with `dequantize=True`);
        modules swapped by `fuse_llama_ops` are given back as the model's own."""
        merged = merge_and_unload(self.model, dequantize=dequantize, dtype=dtype, adapter_names=adapter_names)
        unfuse_llama_ops(merged)
        return merged

    def unload(self) -> nn.Module:
        """The model with every adapter removed and its original layers (and modules) back, nothing merged:
        merged adapters are unmerged first, so the bases are the original modules, bit for bit (as PEFT's
        `unload`; `merge_and_unload` keeps the merge)."""
        self.unmerge_adapter()
        for name in list(self.peft_config):
            self.delete_adapter(name)
        unfuse_llama_ops(self.model)
        return self.model

    # --- parameters -----------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """`(trainable, total)` parameter counts; packed quantized weights count their real elements."""
        trainable = total = 0
        for param in self.model.parameters():
            count = _logical_numel(param)
            total += count
            if param.requires_grad:
                trainable += count
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    # --- files ----------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
        """Save one adapter (the active one by default) in PEFT's format.

        The folder changes as one unit: a save killed at any moment leaves the previous adapter or
        this one, never a mix (see `atomic_files.replace_folder`); other files in it are kept.

        With more than one process every rank calls it: rank 0 writes, the others wait at a barrier.
        A sharded model (FSDP1, FSDP2) has its adapter gathered to full tensors first, so the file is
        the one a single process would write.
        """
        if not self.peft_config:
            raise ValueError(f"no adapter to save into {str(directory)!r}: every adapter was deleted; "
                             "add one with add_adapter or load_adapter first")
        name = adapter_name or (self.active_adapters or list(self.peft_config))[0]
        if name not in self.peft_config:
            raise ValueError(f"adapter {name!r} does not exist; adapters: {list(self.peft_config)}")
        config = self.peft_config[name]
        tensors = None
        if distributed.is_sharded(self.model):                         # collectives: every rank, same order
            tensors = distributed.gather_full(adapter_io.adapter_state_dict(self.model, name, config.bias))
        path = Path(directory)
        try:
            if distributed.is_main_process():
                path = adapter_io.save_adapter(self.model, directory, config, name, tensors)
        finally:                                                       # a failed write must not hang the others
            distributed.barrier()
        return path

    def load_adapter(self, directory: str | os.PathLike, adapter_name: str = "default",
                     is_trainable: bool = False) -> InjectionReport:
        """Add an adapter saved here or by PEFT. On any mismatch the model is left as it was."""
        config, tensors = adapter_io.read_adapter(directory)
        flags = _grad_flags(self.model)
        active = self.active_adapters
        report = self.add_adapter(adapter_name, config)
        try:
            _fill_loaded(self.model, tensors, adapter_name, flags, is_trainable, config.bias)
        except BaseException:
            self.peft_config.pop(adapter_name, None)
            self.reports.pop(adapter_name, None)
            raise
        if active and adapter_name not in active:
            set_active_adapters(self.model, active)
        return report

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False) -> LoraModel:
        """Wrap `model` with an adapter read from `directory` (saved here or by PEFT)."""
        config, tensors = adapter_io.read_adapter(directory)
        flags = _grad_flags(model)
        lora_model = cls(model, config, adapter_name)
        _fill_loaded(model, tensors, adapter_name, flags, is_trainable, config.bias)
        return lora_model if is_trainable else lora_model.eval()


def _refuse_adapted(model: nn.Module, adapter_name: str) -> None:
    """A model that already holds adapters gets more through the object that owns them, not a second facade
    (two facades over one model disagree about which adapters exist)."""
    if isinstance(model, LoraModel):
        raise ValueError(
            f"model is already a LoraModel (adapters: {list(model.peft_config)}); add the adapter to it with "
            f"model.add_adapter({adapter_name!r}, config) instead of wrapping it again"
        )
    existing = adapter_names(model)
    if existing:
        raise ValueError(
            f"model already holds LoRA adapters {existing} (it is a LoraModel's .model, or was given them by "
            f"qlora_inject.inject); call add_adapter({adapter_name!r}, config) on the LoraModel that owns it, "
            f"qlora_inject.inject(model, config, {adapter_name!r}) for the functional form, or unload() first"
        )


def _grad_flags(model: nn.Module) -> dict[str, bool]:
    return {name: p.requires_grad for name, p in model.named_parameters()}


def _fill_loaded(model: nn.Module, tensors: dict, adapter_name: str, flags: dict[str, bool],
                 is_trainable: bool, bias: str) -> None:
    """Copy loaded tensors into a just-injected adapter; on a mismatch remove it and restore `flags`."""
    try:
        adapter_io.check_and_copy(model, tensors, adapter_name, bias)
    except BaseException:
        delete_adapter(model, adapter_name)
        for name, param in model.named_parameters():
            param.requires_grad_(flags.get(name, param.requires_grad))
        raise
    if not is_trainable:                       # this adapter's own tensors, never others' whose path shares its name
        for module in model.modules():
            if isinstance(module, (LoraLinear, ModulesToSaveWrapper)):
                module.set_requires_grad(adapter_name, False)


def _logical_numel(param: nn.Parameter) -> int:
    """Elements of the dense tensor a parameter stands for (a packed 4-bit weight holds two a byte)."""
    state = getattr(param, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return math.prod(int(d) for d in state.shape)
    return param.numel()


__all__ = ["LoraModel", "adapter_names"]
