"""qlora_inject: LoRA adapters for quantized models.

    from qlora_inject import LoraConfig, LoraModel
    model = LoraModel(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"), "default")

Layers of every registered format (bitsandbytes 4-bit and 8-bit, GPTQ, AWQ, HQQ, plain
`nn.Linear`/`Conv1D`, and formats users register) are wrapped with `LoraLinear`, which keeps the
original module as a frozen `base_layer`.
"""

from qlora_inject import backends  # noqa: F401  (registers the built-in backends, dense last)
from qlora_inject.adapter_io import read_adapter, save_adapter
from qlora_inject.config import LoraConfig
from qlora_inject.distributed import fsdp_wrap_policy, shard
from qlora_inject.fused_ops import FusionReport, fuse_llama_ops, unfuse_llama_ops
from qlora_inject.inject import (
    InjectionReport,
    WrappedModule,
    adapter_names,
    delete_adapter,
    inject,
    set_active_adapters,
)
from qlora_inject.lora import AdapterSpec, LoraLinear
from qlora_inject.loss import causal_lm_loss, linear_cross_entropy, why_not_chunked
from qlora_inject.merge_report import MergeGain, measure_merge
from qlora_inject.model import LoraModel
from qlora_inject.modules_to_save import ModulesToSaveWrapper
from qlora_inject.pretrained import load_quantized, model_directory
from qlora_inject.quantize import quantize_model
from qlora_inject.registry import (
    Backend,
    BackendBase,
    UnsupportedModuleError,
    backend_names,
    find_backend,
    format_for,
    get_backend,
    quant_names,
    register_backend,
    unregister_backend,
)
from qlora_inject.targeting import TargetNotFoundError

__version__ = "0.1.0"

__all__ = [
    "AdapterSpec",
    "Backend",
    "BackendBase",
    "FusionReport",
    "InjectionReport",
    "LoraConfig",
    "LoraLinear",
    "LoraModel",
    "MergeGain",
    "ModulesToSaveWrapper",
    "TargetNotFoundError",
    "UnsupportedModuleError",
    "WrappedModule",
    "adapter_names",
    "backend_names",
    "causal_lm_loss",
    "delete_adapter",
    "find_backend",
    "format_for",
    "fsdp_wrap_policy",
    "fuse_llama_ops",
    "get_backend",
    "inject",
    "linear_cross_entropy",
    "why_not_chunked",
    "load_quantized",
    "measure_merge",
    "quant_names",
    "quantize_model",
    "model_directory",
    "read_adapter",
    "register_backend",
    "save_adapter",
    "set_active_adapters",
    "shard",
    "unfuse_llama_ops",
    "unregister_backend",
]
