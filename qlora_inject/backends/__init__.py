"""Built-in backends, registered in dispatch order: quantized formats first, dense last."""

from qlora_inject.backends.awq import AwqBackend
from qlora_inject.backends.bnb import Bnb4bitBackend, Bnb8bitBackend
from qlora_inject.backends.dense import DenseBackend
from qlora_inject.backends.gptq import GptqBackend
from qlora_inject.backends.hqq import HqqBackend
from qlora_inject.registry import register_backend

DENSE = register_backend(DenseBackend())
BNB_8BIT = register_backend(Bnb8bitBackend())
BNB_4BIT = register_backend(Bnb4bitBackend())
HQQ = register_backend(HqqBackend())
AWQ = register_backend(AwqBackend())
GPTQ = register_backend(GptqBackend())

__all__ = ["AwqBackend", "Bnb4bitBackend", "Bnb8bitBackend", "DenseBackend", "GptqBackend", "HqqBackend"]
