"""bitsandbytes layers: `Linear4bit` (NF4/FP4, optional double quantization) and `Linear8bitLt`.

Both subclass `nn.Linear`, so they are registered ahead of the dense backend. They are recognised
by class name along the MRO (no import needed) and, for look-alikes, by their weight's attributes
(`Params4bit.quant_state`, `Int8Params.SCB`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch
from torch import Tensor, nn

from qlora_inject.kernels.dequant_4bit import dequantize_4bit, dequantize_blockwise_8bit
from qlora_inject.kernels.dequant_int8 import dequantize_int8_rowwise
from qlora_inject.registry import BackendBase, class_is


def _import_bnb():
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(
            "this operation needs bitsandbytes; install it with `pip install 'qlora-inject[bnb]'`"
        ) from err
    return bitsandbytes


class Bnb4bitBackend(BackendBase):
    """`bnb.nn.Linear4bit`: packed 4-bit codes in `weight`, scales in `weight.quant_state`.

    Under FSDP the weight parameter is replaced by a plain tensor or a DTensor that has lost
    `quant_state`; bitsandbytes keeps a copy on the module (`module.quant_state`), and so does every
    read here (`_find_quant_state`).
    """

    name = "bnb-4bit"
    quant_names = ("nf4", "fp4")
    package = "bitsandbytes"
    install = "pip install 'qlora-inject[bnb]'"
    saved_by_transformers = True

    def matches(self, module: nn.Module) -> bool:
        weight = getattr(module, "weight", None)
        return class_is(module, "Linear4bit", "bitsandbytes") or (
            hasattr(weight, "quant_state") and hasattr(weight, "quant_type")
        )                                                                    # FSDP2 subclasses it: found by MRO

    def check(self, module: nn.Module) -> None:
        _refuse_repacked(module)

    def quant_name(self, module: nn.Module) -> str:
        state = _find_quant_state(module)
        return getattr(state, "quant_type", None) or getattr(module.weight, "quant_type", None) or "nf4"

    def adopt(self, module: nn.Module) -> None:
        _opt_out_of_repack(module)

    def features(self, module: nn.Module) -> tuple[int, int]:
        if hasattr(module, "in_features"):
            return module.in_features, module.out_features
        out_features, in_features = _quant_state(module).shape
        return in_features, out_features

    def compute_dtype(self, module: nn.Module) -> torch.dtype | None:
        if getattr(module, "compute_dtype", None) is not None:
            return module.compute_dtype
        state = _find_quant_state(module)
        return state.dtype if state is not None else None

    def dequantize(self, module: nn.Module, out: Tensor | None = None) -> Tensor:
        _refuse_repacked(module)
        state = _quant_state(module)
        library = None
        if _library_kernel_is_exact(module.weight.data, state):            # a candidate the CPU dispatch measures
            library = functools.partial(_import_bnb().functional.dequantize_4bit, module.weight.data, state)
        absmax = state.absmax
        if state.nested:
            nested = state.state2
            absmax = dequantize_blockwise_8bit(absmax, nested.code, nested.absmax, nested.blocksize, state.offset)
        return dequantize_4bit(
            module.weight.data, absmax, state.code, state.blocksize, tuple(state.shape), state.dtype, out=out,
            library=library,
        )                                                                    # (out, in)

    def forward(self, module: nn.Module, x: Tensor) -> Tensor:
        _opt_out_of_repack(module)
        _refuse_repacked(module)
        return module(x)

    def quantizer_summary(self, quant: str, group_size: int) -> str:
        return f"bitsandbytes {quant.upper()}, blocks of 64" + (", double quant" if quant == "nf4" else "")

    def quantize(self, linear: nn.Linear, quant: str, *, compute_dtype: torch.dtype = torch.float32,
                 group_size: int = 64, bits: int = 4, device: str | torch.device = "cpu") -> nn.Module:
        """A `Linear4bit` (`quant`: nf4 or fp4, double-quantized, blocksize 64) of `linear`'s weight."""
        bnb = _import_bnb()
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=compute_dtype, quant_type=quant, compress_statistics=True,
                                  device="meta")
        layer.weight = bnb.nn.Params4bit(linear.weight.detach().to("cpu", compute_dtype), requires_grad=False,
                                         quant_type=quant, compress_statistics=True)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().to(compute_dtype).clone(), requires_grad=False)
        return layer.to(device)                                               # bnb quantizes here

    def load_causal_lm(self, path, quant: str, *, compute_dtype: torch.dtype = torch.float32,
                       dtype: torch.dtype | None = None, shardable: bool = False, group_size: int | None = None):
        """Loaded by transformers with a `BitsAndBytesConfig` (`nf4` double-quantized; `shardable`: weights
        stored as float32, which FSDP shards), on this process's GPU or the CPU, never repacked."""
        settings = dict(load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_compute_dtype=compute_dtype,
                        bnb_4bit_use_double_quant=quant == "nf4")
        if shardable:
            settings["bnb_4bit_quant_storage"] = torch.float32
        return _load_with_bitsandbytes(path, settings, dtype)

    def requantize(self, module: nn.Module, weight: Tensor) -> nn.Module:
        bnb = _import_bnb()
        state = _quant_state(module)
        old = module.weight
        in_features, out_features = self.features(module)
        new = bnb.nn.Linear4bit(
            in_features, out_features, bias=module.bias is not None, compute_dtype=module.compute_dtype,
            compress_statistics=state.nested, quant_type=state.quant_type, quant_storage=old.data.dtype,
            device="meta",
        )
        new.weight = bnb.nn.Params4bit(
            weight.detach().to("cpu", state.dtype), requires_grad=False, blocksize=state.blocksize,
            compress_statistics=state.nested, quant_type=state.quant_type, quant_storage=old.data.dtype,
        ).to(old.device)                                                     # bnb quantizes on .to()
        if module.bias is not None:
            new.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=module.bias.requires_grad)
        return new


class Bnb8bitBackend(BackendBase):
    """`bnb.nn.Linear8bitLt` (LLM.int8): int8 rows `CB` and row scales `SCB`, W ≈ CB·SCB/127.

    Outside training, and on GPUs, bitsandbytes' forward is LLM.int8: it rounds the activations to
    int8 and, with `threshold > 0`, routes outlier input columns through a separate fp16 matmul, which
    dequantize-then-matmul would not reproduce, so the fused op keeps that forward. A training layer
    on CPU (or XPU) is computed by bitsandbytes (versions with `MatMul8bitFp`) as x·(CB·(SCB·(1/127)))ᵀ + b;
    `dequantize` rounds the same way, so there the fused op does that matmul itself.
    """

    name = "bnb-8bit"
    quant_names = ("int8",)
    package = "bitsandbytes"
    install = "pip install 'qlora-inject[bnb]'"
    saved_by_transformers = True

    def matches(self, module: nn.Module) -> bool:
        weight = getattr(module, "weight", None)
        return class_is(module, "Linear8bitLt", "bitsandbytes") or (
            hasattr(weight, "SCB") and hasattr(weight, "CB") and hasattr(module, "state")
        )

    def forward_is_exact(self, module: nn.Module, device: torch.device) -> bool:
        """True where bitsandbytes itself computes x·dequantize(W)ᵀ: unquantized (fp16) weights, or a
        layer in training mode on CPU/XPU with a bitsandbytes that has that path."""
        if module.weight.dtype != torch.int8:
            return True
        return module.training and device.type in ("cpu", "xpu") and _bnb_trains_8bit_dequantized()

    def dequantize(self, module: nn.Module, out: Tensor | None = None) -> Tensor:
        weight = module.weight
        if weight.dtype != torch.int8:                                      # has_fp16_weights, not quantized
            return weight.detach()
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        if scales is None:
            raise ValueError(
                f"{type(module).__name__} holds int8 weights but no row scales (weight.SCB and state.SCB "
                "are both None); load it through bitsandbytes/transformers so the scales are set"
            )
        return dequantize_int8_rowwise(weight.data, scales, out)              # (out, in), bnb's rounding

    def forward(self, module: nn.Module, x: Tensor) -> Tensor:
        return module(x)

    def quantizer_summary(self, quant: str, group_size: int) -> str:
        return "bitsandbytes LLM.int8, per row"

    def quantize(self, linear: nn.Linear, quant: str, *, compute_dtype: torch.dtype = torch.float32,
                 group_size: int = 64, bits: int = 8, device: str | torch.device = "cpu") -> nn.Module:
        """A `Linear8bitLt` (row-wise int8, no outlier threshold) of `linear`'s weight."""
        bnb = _import_bnb()
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False, threshold=0.0, device="meta")
        layer.weight = bnb.nn.Int8Params(linear.weight.detach().to("cpu", torch.float16), requires_grad=False,
                                         has_fp16_weights=False)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer.to(device)                                               # bnb quantizes here

    def load_causal_lm(self, path, quant: str, *, compute_dtype: torch.dtype = torch.float32,
                       dtype: torch.dtype | None = None, shardable: bool = False, group_size: int | None = None):
        """Loaded by transformers with `BitsAndBytesConfig(load_in_8bit=True)` (FSDP cannot shard int8 weights)."""
        return _load_with_bitsandbytes(path, dict(load_in_8bit=True), dtype)

    def requantize(self, module: nn.Module, weight: Tensor) -> nn.Module:
        bnb = _import_bnb()
        in_features, out_features = self.features(module)
        device = module.weight.device
        new = bnb.nn.Linear8bitLt(
            in_features, out_features, bias=module.bias is not None, has_fp16_weights=False,
            threshold=module.state.threshold, device="meta",
        )
        new.weight = bnb.nn.Int8Params(
            weight.detach().to("cpu", torch.float16), requires_grad=False, has_fp16_weights=False
        ).to(device)                                                         # bnb quantizes on .to()
        if module.bias is not None:
            new.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=module.bias.requires_grad)
        return new


def _load_with_bitsandbytes(path, settings: dict, dtype: torch.dtype | None):
    """A causal LM quantized by transformers' bitsandbytes integration on this rank's GPU (or the CPU), its
    4-bit layers told never to repack, so an eval-mode forward (a fusion probe, scoring) keeps them trainable."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(**settings),
                                                 device_map=device, **({} if dtype is None else {"dtype": dtype}))
    return never_repack(model)


@functools.cache
def _bnb_trains_8bit_dequantized() -> bool:
    """Whether the installed bitsandbytes trains int8 layers on CPU/XPU as dequantize-then-matmul
    (`MatMul8bitFp`) rather than with LLM.int8's rounded activations."""
    try:
        return hasattr(importlib.import_module("bitsandbytes.autograd._functions"), "MatMul8bitFp")
    except Exception:                                                      # noqa: BLE001 - any failure: keep its forward
        return False


def _library_kernel_is_exact(packed: Tensor, state) -> bool:
    """True for a CPU layer whose rows are whole blocks, where bitsandbytes' own dequantization gives
    this library's values bit for bit: then it is one of the paths `kernels.autotune` measures (on the
    machine of the earlier fixed threshold it won below about 32 MiB of dense weight: 60 µs vs 155 µs
    at 1408 × 512, but 11 ms vs 2.3 ms at 5632 × 2048)."""
    shape = tuple(state.shape)
    return (packed.device.type == "cpu" and len(shape) == 2 and shape[1] % state.blocksize == 0
            and importlib.util.find_spec("bitsandbytes") is not None)


def _opt_out_of_repack(module: nn.Module) -> None:
    """Keep a 4-bit layer in bitsandbytes' portable layout while it is a LoRA base (and after `unload`).

    On CPUs with AVX512-BF16, bitsandbytes (0.49, 0.50) repacks a `Linear4bit` in place the first
    time it runs in eval mode on an input that needs no gradient: a CPU-only tile layout, absmax
    rounded to bf16 and transposed. That would change the frozen base's bits (and bitsandbytes'
    own inverse does not restore absmax's order), so wrapped layers opt out of the repack.
    """
    if getattr(module, "support_avx512bf16_for_cpu", False):
        module.support_avx512bf16_for_cpu = False


def never_repack(model: nn.Module) -> nn.Module:
    """`model`, its bitsandbytes 4-bit layers told never to repack themselves (in place).

    On the first eval-mode forward on a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer for
    its inference kernel: other numerics, and a backward that autograd does not know (wrong input
    gradients, with only a warning). A layer that LoRA wraps never repacks (`adopt`); this keeps the
    others (not targeted, or run bare by a fusion probe, an evaluation or a benchmark) trainable as well.
    """
    for module in model.modules():
        _opt_out_of_repack(module)
    return model


def _refuse_repacked(module: nn.Module) -> None:
    """A layer repacked for CPU inference before it was wrapped cannot train: refuse it, naming the fix."""
    state = _find_quant_state(module)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        raise ValueError(
            f"this {type(module).__name__} was repacked by bitsandbytes for CPU inference (it ran in eval mode "
            "before being wrapped; quant_state.packing_format_for_cpu=True), a layout that cannot train and that "
            "bitsandbytes cannot undo exactly. Reload the model and inject LoRA before running it in eval mode"
        )


def _find_quant_state(module: nn.Module):
    """The layer's `QuantState`: on its weight, or, where FSDP swapped the weight parameter for a plain
    tensor or DTensor that dropped it, the copy bitsandbytes keeps on the module; None if neither has one."""
    state = getattr(module.weight, "quant_state", None)
    return state if state is not None else getattr(module, "quant_state", None)


def _quant_state(module: nn.Module):
    state = _find_quant_state(module)
    if state is None:
        raise ValueError(
            f"{type(module).__name__} has not been quantized yet (weight.quant_state and module.quant_state "
            "are None); "
            "bitsandbytes quantizes when the layer is moved to a device: call `.to('cuda')` or `.to('cpu')` first"
        )
    return state
