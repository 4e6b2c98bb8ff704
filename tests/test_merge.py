"""Merge, exact unmerge, dense export and mixed batches, on every format."""

from __future__ import annotations

import pytest
import torch

from qlora_inject import LoraConfig, LoraModel

from conftest import requires
from factories import FORMAT_LAYERS, IN_FEATURES, Holder, format_params, load_tiny_llama
from parity import assert_same_state, clone_state

# Format → the largest relative output error its merge may report.
MERGE_ERROR = {"dense": 1e-6, "nf4": 0.25, "fp4": 0.25, "int8-outliers": 0.05, "hqq": 0.25, "gptq-act-order": 0.25,
               "awq": 0.25, "autoawq": 0.25}
PARAMS = format_params(*MERGE_ERROR)


def adapted(fmt: str, **config) -> LoraModel:
    """The format's layer with a random adapter; every call builds the same one."""
    torch.manual_seed(11)
    settings = {"r": 4, "lora_alpha": 4, "target_modules": ["proj"], "init_lora_weights": False}
    settings.update(config)
    model = LoraModel(Holder(FORMAT_LAYERS[fmt][0]()), LoraConfig(**settings))
    with torch.no_grad():
        model.model.proj.lora_B["default"].weight.mul_(0.1)              # an update of realistic size
    return model


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("fmt", PARAMS)
def test_merge_is_within_its_reported_error_and_unmerge_is_exact(fmt, dora):
    model = adapted(fmt, use_dora=dora)
    x = torch.randn(4, 6, IN_FEATURES)
    with torch.no_grad():
        expected = model(x)
    base_before = clone_state(model.model.proj.base_layer)
    results = model.merge_adapter()
    result = results["proj"]
    assert result.adapters == ("default",)
    assert result.relative_error < MERGE_ERROR[fmt], result
    assert model.model.proj.merged_adapters == ["default"]
    with torch.no_grad():
        merged = model(x)
    assert relative(merged, expected) <= 2 * result.relative_error + 1e-6
    model.unmerge_adapter()
    assert_same_state(base_before, clone_state(model.model.proj.base_layer))
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("fmt", PARAMS)
def test_merge_and_unload_keeps_the_format_or_exports_dense(fmt):
    x = torch.randn(3, IN_FEATURES)
    model = adapted(fmt, use_dora=True)
    base_class = type(model.model.proj.base_layer)
    with torch.no_grad():
        expected = model(x)
    dense = adapted(fmt, use_dora=True).merge_and_unload(dequantize=True, dtype=torch.float32)
    assert type(dense.proj) is torch.nn.Linear
    tolerance = 0.03 if fmt.startswith("int8") else 1e-4                              # LLM.int8 rounds its activations
    with torch.no_grad():
        assert relative(dense(x), expected) < tolerance
    kept = adapted(fmt, use_dora=True).merge_and_unload()
    assert type(kept.proj) in (base_class, *_requantized_classes(fmt))
    with torch.no_grad():
        assert relative(kept(x), expected) < MERGE_ERROR[fmt]


def _requantized_classes(fmt: str) -> tuple[type, ...]:
    if fmt == "autoawq":                                                     # requantized with GPTQModel's AWQ kernel
        from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear

        return (AwqTorchLinear,)
    return ()


@pytest.mark.parametrize("other_is_dora", [False, True], ids=["gathered", "looped-dora"])
@pytest.mark.parametrize("fmt", PARAMS)
def test_mixed_batch_gives_each_sample_its_own_adapter(fmt, other_is_dora):
    model = adapted(fmt)
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=8, target_modules=["proj"], init_lora_weights=False,
                                          use_dora=other_is_dora))
    x = torch.randn(5, 3, IN_FEATURES)
    names = ["default", "__base__", "other", "default", "other"]
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
        singles = {}
        for name in ("default", "other"):
            model.set_adapter(name)
            singles[name] = model(x)
        with model.disable_adapter():
            singles["__base__"] = model(x)
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], singles[name][i], atol=1e-5, rtol=1e-4)


def test_mixed_batch_errors():
    model = adapted("dense")
    with pytest.raises(ValueError, match=r"adapter_names names \['nope'\], which do not exist"):
        model(torch.randn(2, IN_FEATURES), adapter_names=["default", "nope"])
    with pytest.raises(ValueError, match=r"adapter_names has 1 entries but the batch has 2 samples"):
        model(torch.randn(2, IN_FEATURES), adapter_names=["default"])
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"cannot run a mixed batch while \['default'\] are merged"):
        model(torch.randn(1, IN_FEATURES), adapter_names=["default"])


@requires("transformers")
@requires("bitsandbytes")
def test_dense_export_of_a_4bit_llama_matches_the_adapted_logits():
    model = LoraModel(load_tiny_llama("nf4"), LoraConfig(r=4, target_modules="all-linear", modules_to_save=["lm_head"],
                                                         init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.mul_(0.1)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        dense = model.merge_and_unload(dequantize=True)
        assert not any(type(m).__name__ in ("Linear4bit", "LoraLinear", "ModulesToSaveWrapper")
                       for m in dense.modules())
        torch.testing.assert_close(dense(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_mixed_batch_trains_each_adapter_on_its_own_samples():
    model = adapted("dense")
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=8, target_modules=["proj"], init_lora_weights=False))
    model.set_adapter(["default", "other"])                                   # both trainable
    layer = model.model.proj
    x = torch.randn(4, 3, IN_FEATURES)
    names = ["other", "default", "__base__", "other"]
    model(x, adapter_names=names).square().sum().backward()
    mixed = {n: layer.lora_A[n].weight.grad.clone() for n in ("default", "other")}
    model.zero_grad()
    for i, name in enumerate(names):
        if name == "__base__":
            continue
        model.set_adapter(name)
        model(x[i:i + 1]).square().sum().backward()
    for name in ("default", "other"):
        torch.testing.assert_close(mixed[name], layer.lora_A[name].weight.grad, atol=1e-4, rtol=1e-4)


def test_mixed_batch_reuses_stacked_adapters_until_a_weight_changes():
    model = adapted("dense")
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=8, target_modules=["proj"], init_lora_weights=False))
    layer = model.model.proj
    x = torch.randn(2, 3, IN_FEATURES)
    names = ["default", "other"]
    with torch.no_grad():
        first = model(x, adapter_names=names)
        stacked = layer.__dict__["_stack_cache"][1][0]
        second = model(x, adapter_names=names)
        assert layer.__dict__["_stack_cache"][1][0] is stacked                # reused, not rebuilt
        torch.testing.assert_close(first, second)
        layer.lora_B["other"].weight.add_(1.0)                              # an in-place change invalidates it
        changed = model(x, adapter_names=names)
    assert layer.__dict__["_stack_cache"][1][0] is not stacked
    assert torch.equal(changed[0], first[0]) and not torch.allclose(changed[1], first[1])
