"""Compute kernels, installed as `qlora_inject.kernels` (never as a top-level `kernels`).

Each op comes as a pure-torch reference that runs everywhere and is the test oracle; a Triton
version sits beside it where one exists, chosen on CUDA.
"""

if __name__ != "qlora_inject.kernels":
    # Imported as a top-level `kernels` (the repo root is on sys.path): that name belongs to the
    # Hugging Face kernel hub, which bitsandbytes and transformers probe for. Look absent to them.
    raise ImportError(f"this folder is qlora_inject.kernels, not {__name__!r}; import qlora_inject instead")

from qlora_inject.kernels.dequant_4bit import dequantize_4bit_blockwise, dequantize_blockwise_8bit

__all__ = ["dequantize_4bit_blockwise", "dequantize_blockwise_8bit"]
