"""Built-in backends, registered in dispatch order: quantized formats first, dense last."""

from qlora_inject.backends.awq import AwqBackend
from qlora_inject.backends.bnb import Bnb4bitBackend, Bnb8bitBackend
from qlora_inject.backends.dense import DenseBackend
from qlora_inject.backends.gptq import GptqBackend
from qlora_inject.backends.hqq import HqqBackend
from qlora_inject.registry import register_backend

for _backend in (DenseBackend(), Bnb4bitBackend(), Bnb8bitBackend(), GptqBackend(), AwqBackend(), HqqBackend()):
    register_backend(_backend)                   # each goes in front of dense: the quantized formats first

__all__ = ["AwqBackend", "Bnb4bitBackend", "Bnb8bitBackend", "DenseBackend", "GptqBackend", "HqqBackend"]
