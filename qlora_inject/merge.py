"""Merging adapters into their bases, undoing it exactly, and exporting a model without adapters.

    merge(model)                           requantize(dequantize(W) + s·B A) in each base's own format
    unmerge(model)                         the original quantized modules back, bit for bit
    merge_and_unload(model)                a model without LoRA layers, bases in their own formats
    merge_and_unload(model, dequantize=True)  a plain dense model (fp16/bf16 or the compute dtype)
"""

from __future__ import annotations

import torch
from torch import nn

from qlora_inject.lora import LoraLinear, MergeResult
from qlora_inject.modules_to_save import ModulesToSaveWrapper
from qlora_inject.quantize import linear_from
from qlora_inject.registry import find_backend
from qlora_inject.targeting import iter_modules, replace_module


def merge(model: nn.Module, adapter_names: list[str] | None = None) -> dict[str, MergeResult]:
    """Merge the active adapters (or `adapter_names`) into every LoRA layer; return each layer's error."""
    results = {}
    for name, module in iter_modules(model):
        if isinstance(module, LoraLinear):
            result = module.merge(adapter_names)
            if result is not None:
                results[name] = result
    return results


def unmerge(model: nn.Module) -> None:
    """Restore every merged layer's original base module (the same objects, so the same bits)."""
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.unmerge()


def merge_and_unload(model: nn.Module, dequantize: bool = False, dtype: torch.dtype | None = None,
                     adapter_names: list[str] | None = None) -> nn.Module:
    """Merge and remove every LoRA layer, in place; return the model.

    Args:
        dequantize: False keeps each base in its own quantized format (merged by requantizing);
            True replaces every quantized layer of the model, wrapped or not, by a dense
            `nn.Linear` holding its dequantized (and merged) weight: a plain model to serve anywhere.
        dtype: The dense dtype with `dequantize=True`; default: each layer's compute dtype (fp32 if
            it has none).
        adapter_names: Which adapters to merge; default: the active ones.
    """
    for name, module in list(iter_modules(model)):
        if isinstance(module, LoraLinear):
            # Adapters merged before stay merged, in both forms (the quantized merge folds new ones in on top).
            names = list(dict.fromkeys([*module.merged_adapters, *(adapter_names or module.active_adapters)]))
            if dequantize:
                target_dtype = dtype or module.default_dtype() or torch.float32
                replacement = module.merged_dense(names, target_dtype)
            else:
                module.merge(names)
                replacement = module.base_layer
        elif isinstance(module, ModulesToSaveWrapper):
            replacement = module.active_module
        else:
            continue
        replace_module(model, name, replacement)
    if dequantize:
        for name, module in list(iter_modules(model)):
            backend = find_backend(module)
            if backend is not None and backend.name != "dense":
                replace_module(model, name, _dense_copy(module, backend, dtype))
        _forget_quantization(model)
    return model


def _forget_quantization(model: nn.Module) -> None:
    """Drop transformers' record that the model was quantized, so that it saves and reloads as dense."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    for attribute, value in (("hf_quantizer", None), ("is_quantized", False), ("quantization_method", None),
                             ("is_loaded_in_4bit", False), ("is_loaded_in_8bit", False)):
        if attribute in vars(model):
            setattr(model, attribute, value)


def _dense_copy(module: nn.Module, backend, dtype: torch.dtype | None) -> nn.Linear:
    with torch.no_grad():
        weight = backend.dequantize(module)
    target = dtype or backend.compute_dtype(module) or weight.dtype
    return linear_from(weight, getattr(module, "bias", None), target, weight.device).requires_grad_(False)
