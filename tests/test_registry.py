"""The registry: dispatch order, user backends, and what an unknown layer is told."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qlora_inject import (
    LoraConfig,
    UnsupportedModuleError,
    backend_names,
    find_backend,
    inject,
    register_backend,
    unregister_backend,
)

from conftest import requires


class RowScaledInt8Linear(nn.Module):
    """A made-up quantized layer (int8 codes, per-row scale) that is not an nn.Linear."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        scale = weight.abs().amax(dim=1) / 127
        self.register_buffer("codes", torch.round(weight / scale[:, None]).to(torch.int8))
        self.register_buffer("row_scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.codes.float() * self.row_scale[:, None])


class RowScaledBackend:
    name = "row-scaled-int8"

    def matches(self, module):
        return isinstance(module, RowScaledInt8Linear)

    def features(self, module):
        out_features, in_features = module.codes.shape
        return in_features, out_features

    def compute_dtype(self, module):
        return torch.float32

    def dequantize(self, module):
        return module.codes.float() * module.row_scale[:, None]

    def forward(self, module, x):
        return module(x)

    def requantize(self, module, weight):
        return RowScaledInt8Linear(weight)


@pytest.fixture
def row_scaled_backend():
    backend = register_backend(RowScaledBackend())
    yield backend
    unregister_backend(backend.name)


def test_builtin_dispatch_order_puts_dense_last():
    names = backend_names()
    assert names[-1] == "dense"
    assert names.index("bnb-4bit") < names.index("dense")
    assert names.index("bnb-8bit") < names.index("dense")


def test_a_user_backend_goes_before_dense_and_is_used(row_scaled_backend):
    assert backend_names().index("row-scaled-int8") < backend_names().index("dense")
    model = nn.Sequential(RowScaledInt8Linear(torch.randn(6, 8)), nn.ReLU(), nn.Linear(6, 3))
    report = inject(model, LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    assert report.backends() == {"row-scaled-int8": 1, "dense": 1}
    x = torch.randn(4, 8)
    assert model(x).shape == (4, 3)


def test_all_linear_matches_quantized_layers_that_are_not_linear(row_scaled_backend):
    model = nn.ModuleDict({"a": RowScaledInt8Linear(torch.randn(6, 8)), "b": nn.Linear(8, 8)})
    report = inject(model, LoraConfig(target_modules="all-linear"))
    assert sorted(w.name for w in report.wrapped) == ["a", "b"]


def test_unknown_layer_error_names_class_backends_and_how_to_register():
    model = nn.Sequential(nn.Conv2d(3, 3, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModuleError, match=(
            r"module '0' is a torch\.nn\.modules\.conv\.Conv2d, which no backend handles "
            r"\(registered: \[.*'dense'\]\).*register_backend\(MyBackend\(\)\)")):
        inject(model, LoraConfig(target_modules=["0"]))
    assert isinstance(model[0], nn.Conv2d)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_register_refuses_non_backends_and_duplicates():
    with pytest.raises(TypeError, match=r"is not a Backend: it lacks \['features'"):
        register_backend(type("Half", (), {"name": "half", "matches": lambda self, m: False})())
    with pytest.raises(ValueError, match=r"a backend named 'dense' is already registered"):
        register_backend(RowScaledBackend.__new__(type("Dense", (RowScaledBackend,), {"name": "dense"})))


@requires("bitsandbytes")
def test_bnb_layers_are_recognised_by_attributes_too():
    """A look-alike (not bitsandbytes' class) carrying a Params4bit-like weight is dispatched as 4-bit."""
    from factories import make_bnb4

    real = make_bnb4()

    class Lookalike(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = real.weight
            self.bias = real.bias
            self.in_features, self.out_features = real.in_features, real.out_features
            self.compute_dtype = torch.float32

    assert find_backend(Lookalike()).name == "bnb-4bit"
    torch.testing.assert_close(find_backend(Lookalike()).dequantize(Lookalike()), find_backend(real).dequantize(real))


class RowScaledWithScratch(RowScaledBackend):
    """README's seven methods, with a `dequantize` that takes the `out=` scratch, and no `fused` flag."""

    name = "row-scaled-int8-out"

    def dequantize(self, module, out=None):
        weight = module.codes.float() * module.row_scale[:, None]
        return weight if out is None else out.view_as(weight).copy_(weight)


def _fused_calls_while_training(backend, monkeypatch) -> int:
    from qlora_inject import lora

    calls = []
    original = lora.fused_lora_linear
    monkeypatch.setattr(lora, "fused_lora_linear", lambda *a, **k: calls.append(1) or original(*a, **k))
    register_backend(backend)
    try:
        weight = torch.randn(16, 32)
        model = nn.Sequential(RowScaledInt8Linear(weight))
        inject(model, LoraConfig(r=4, target_modules=["0"], init_lora_weights=False))
        x = torch.randn(5, 32, requires_grad=True)
        y = model(x)
        y.sum().backward()
        layer = model[0]
        expected = F.linear(x, layer.base_layer.codes.float() * layer.base_layer.row_scale[:, None])
        expected = expected + layer.scaling["default"] * (x @ layer.lora_A["default"].weight.t()
                                                          @ layer.lora_B["default"].weight.t())
        torch.testing.assert_close(y, expected)
        assert layer.lora_A["default"].weight.grad is not None
    finally:
        unregister_backend(backend.name)
    return len(calls)


def test_a_user_backend_whose_dequantize_takes_out_trains_through_the_fused_op(monkeypatch):
    from qlora_inject.registry import trains_fused

    assert trains_fused(RowScaledWithScratch()) and not trains_fused(RowScaledBackend())
    assert _fused_calls_while_training(RowScaledWithScratch(), monkeypatch) == 1
    assert _fused_calls_while_training(RowScaledBackend(), monkeypatch) == 0     # no scratch: the unfused path


def test_backend_base_gives_the_documented_defaults():
    from qlora_inject.registry import BackendBase, base_forward_is_exact, declared_forward_rtol, trains_fused

    class Minimal(BackendBase):
        name = "minimal"

        def matches(self, module):
            return False

        def dequantize(self, module, out=None):
            return module.weight

    backend, layer = Minimal(), nn.Linear(8, 4)
    assert backend.features(layer) == (8, 4) and backend.compute_dtype(layer) is None
    assert trains_fused(backend) and base_forward_is_exact(backend, layer, torch.device("cpu"))
    assert declared_forward_rtol(backend, layer, torch.float32) is None
    x = torch.randn(2, 8)
    assert torch.equal(backend.forward(layer, x), layer(x))
    with pytest.raises(NotImplementedError, match=r"'minimal' backend cannot requantize.*dequantize=True"):
        backend.requantize(layer, torch.zeros(4, 8))
    fit = r"weight of shape \(3, 8\) does not fit a 8->4 layer, which needs \(4, 8\) \(minimal backend\)"
    with pytest.raises(ValueError, match=fit):
        backend.check_weight_shape(layer, torch.zeros(3, 8))
    Minimal.fused = False                                   # an explicit flag wins over the signature
    assert not trains_fused(Minimal())


@requires("bitsandbytes")
def test_asking_a_backend_about_a_module_never_changes_it():
    from factories import FORMAT_LAYERS

    for fmt, (make, package) in FORMAT_LAYERS.items():
        if package is not None and __import__("importlib").util.find_spec(package) is None:
            continue
        module = make()
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = True            # as bitsandbytes sets it on AVX512-BF16 machines
        before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in vars(module).items()
                  if not k.startswith("_")}
        state = {k: v.clone() for k, v in module.state_dict().items()}
        backend = find_backend(module)
        backend.features(module)
        backend.compute_dtype(module)
        backend.dequantize(module)
        after = {k: v for k, v in vars(module).items() if not k.startswith("_")}
        assert before.keys() == after.keys(), fmt
        for key, value in before.items():
            same = torch.equal(value, after[key]) if isinstance(value, torch.Tensor) else value == after[key]
            assert same, f"{fmt}: asking {backend.name} changed {key}"
        assert all(torch.equal(state[k], v) for k, v in module.state_dict().items()), fmt
