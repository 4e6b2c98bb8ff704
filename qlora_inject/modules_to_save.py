"""`ModulesToSaveWrapper`: a module trained in full (a head, an embedding) as part of an adapter.

The original stays frozen as `original_module`; each adapter trains its own copy in
`modules_to_save[adapter]`. PEFT's layout and names, so the saved keys match PEFT's.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from qlora_inject.mixed_batch import assigned_adapters


def check_trainable_in_full(module: nn.Module, name: str, modules_to_save: list[str] | str) -> None:
    """Refuse a module whose weights cannot train in full: a quantized layer, or one holding integer parameters.

    Raises:
        ValueError: Naming the module, its format, and the fix (LoRA through `target_modules`).
    """
    from qlora_inject.registry import find_backend

    backend = find_backend(module)
    if backend is not None and backend.name != "dense":
        what = f"a {backend.name} quantized layer ({type(module).__name__})"
    else:
        packed = [n for n, p in module.named_parameters() if not p.is_floating_point()]
        if not packed:
            return
        what = f"a {type(module).__name__} with non-float parameters {packed}"
    raise ValueError(
        f"modules_to_save={modules_to_save!r} names {name!r}, {what}, which cannot be trained in full "
        "(its weights are not floating point); put it in target_modules to train it with LoRA, or remove it "
        "from modules_to_save"
    )


class ModulesToSaveWrapper(nn.Module):
    """Routes calls to the active adapter's trainable copy, or to the original when none is active."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disable_adapters = False
        self.batch_adapters: list[str] | None = None             # per sample, set by hand (see LoraLinear)

    def build_copy(self) -> nn.Module:
        """A trainable copy of the original, not yet attached."""
        clone = copy.deepcopy(self.original_module)
        for param in clone.parameters():
            param.requires_grad_(True)
        return clone

    def add_copy(self, adapter_name: str, module: nn.Module) -> None:
        """Attach a copy made by `build_copy` as adapter `adapter_name`'s."""
        self.modules_to_save[adapter_name] = module

    def delete_adapter(self, adapter_name: str) -> None:
        """Drop adapter `adapter_name`'s copy."""
        del self.modules_to_save[adapter_name]

    @property
    def adapters(self) -> list[str]:
        """The adapters that hold a copy here, in the order they were added."""
        return list(self.modules_to_save)

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """The parameters of adapter `adapter_name`'s copy (none if it has no copy here)."""
        module = self.modules_to_save[adapter_name] if adapter_name in self.modules_to_save else None
        return [] if module is None else list(module.parameters())

    def set_requires_grad(self, adapter_name: str, requires_grad: bool = True) -> None:
        """Freeze (`False`) or unfreeze adapter `adapter_name`'s copy, and no other."""
        for param in self.adapter_parameters(adapter_name):
            param.requires_grad_(requires_grad)

    def adapter_state_keys(self, adapter_name: str) -> dict[str, str]:
        """PEFT's key → this wrapper's state-dict key (relative to it) for adapter `adapter_name`'s copy: PEFT
        saves the copy under the original's names (`lm_head.weight`), dropping `modules_to_save.<name>`."""
        if adapter_name not in self.modules_to_save:
            return {}
        return {key: f"modules_to_save.{adapter_name}.{key}" for key in self.modules_to_save[adapter_name].state_dict()}

    def set_adapter(self, adapter_names: list[str]) -> None:
        """Activate the first of `adapter_names` that has a copy here (one copy can run at a time)."""
        self.active_adapters = list(adapter_names)
        for name in self.adapters:
            self.set_requires_grad(name, name in self.active_adapters)

    @property
    def active_module(self) -> nn.Module:
        if not self.disable_adapters:
            for name in self.active_adapters:
                if name in self.modules_to_save:
                    return self.modules_to_save[name]
        return self.original_module

    @property
    def weight(self):
        return self.active_module.weight

    def forward(self, x, *args, **kwargs):
        names = assigned_adapters(self)
        names = self.batch_adapters if names is None else names
        if names is None or self.disable_adapters:
            return self.active_module(x, *args, **kwargs)
        groups = {name: [i for i, n in enumerate(names) if n == name] for name in dict.fromkeys(names)}
        outputs, order = [], []
        for name, rows in groups.items():
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            outputs.append(module(x[rows], *args, **kwargs))
            order.extend(rows)
        return torch.cat(outputs)[torch.tensor(order, device=x.device).argsort()]
