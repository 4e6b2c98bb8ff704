"""Which modules a config selects: lists, regexes, all-linear, exclusions, layer filters."""

from __future__ import annotations

import pytest

from qlora_inject import LoraConfig, TargetNotFoundError
from qlora_inject.targeting import layer_index, select_targets

from conftest import requires
from factories import LLAMA_PROJECTIONS, load_tiny_llama

pytestmark = requires("transformers")


@pytest.fixture(scope="module")
def llama():
    return load_tiny_llama("none")


def names(model, **config):
    return [name for name, _ in select_targets(model, LoraConfig(**config))]


def test_suffix_list(llama):
    got = names(llama, target_modules=["q_proj", "down_proj"])
    assert got == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                   "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]


def test_regex_must_match_whole_name(llama):
    assert names(llama, target_modules=r".*\.1\.self_attn\.(q|v)_proj") == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_all_linear_skips_output_head(llama):
    got = names(llama, target_modules="all-linear")
    assert len(got) == 2 * len(LLAMA_PROJECTIONS)
    assert "lm_head" not in got


@requires("bitsandbytes")
def test_all_linear_on_a_4bit_model(llama):
    model = load_tiny_llama("nf4")
    assert names(model, target_modules="all-linear") == names(llama, target_modules="all-linear")


def test_exclude_modules(llama):
    got = names(llama, target_modules="all-linear", exclude_modules=["k_proj", "mlp.up_proj"])
    assert not any(n.endswith(("k_proj", "up_proj")) for n in got)
    assert len(got) == 2 * (len(LLAMA_PROJECTIONS) - 2)
    assert names(llama, target_modules=["q_proj"], exclude_modules=r".*layers\.0\..*") == [
        "model.layers.1.self_attn.q_proj"]


def test_layers_to_transform(llama):
    assert names(llama, target_modules=["v_proj"], layers_to_transform=[1], layers_pattern="layers") == [
        "model.layers.1.self_attn.v_proj"]
    assert names(llama, target_modules=["v_proj"], layers_to_transform=0) == ["model.layers.0.self_attn.v_proj"]


def test_layer_index_parsing():
    assert layer_index("model.layers.12.mlp.up_proj", "layers") == 12
    assert layer_index("transformer.h.3.attn.c_attn", None) == 3
    assert layer_index("lm_head", None) is None
    assert layer_index("model.layers.2.mlp", ["blocks"]) is None


def test_default_targets_come_from_model_type(llama):
    assert names(llama) == [n for n in names(llama, target_modules=["q_proj", "v_proj"])]


def test_misspelt_target_suggests_close_names(llama):
    with pytest.raises(TargetNotFoundError, match=r"'q_porj' matches no module.*did you mean \['q_proj'"):
        select_targets(llama, LoraConfig(target_modules=["q_proj", "q_porj"]))


def test_regex_matching_nothing_is_refused(llama):
    with pytest.raises(TargetNotFoundError, match=r"regex 'q_proj' matches no module name; it must match a whole"):
        select_targets(llama, LoraConfig(target_modules="q_proj"))
