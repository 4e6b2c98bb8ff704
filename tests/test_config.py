"""LoraConfig: validation at the boundary, and adapter_config.json both ways with PEFT."""

from __future__ import annotations

import json

import pytest
import torch

from qlora_inject import LoraConfig

from conftest import requires


@pytest.mark.parametrize("r", [0, -4, 2.5, True])
def test_bad_rank_is_refused(r):
    with pytest.raises(ValueError, match=rf"r={r!r} must be a positive integer, e\.g\. r=16"):
        LoraConfig(r=r)


def test_bad_rank_pattern_is_refused():
    with pytest.raises(ValueError, match=r"rank_pattern\['q_proj'\]=0 must be a positive integer"):
        LoraConfig(rank_pattern={"q_proj": 0})


def test_bad_regex_is_refused():
    with pytest.raises(ValueError, match=r"target_modules='q_proj\[' is not a valid regular expression"):
        LoraConfig(target_modules="q_proj[")


@pytest.mark.parametrize(("field", "value", "message"), [
    ("bias", "some", r"bias='some' is not one of \('none', 'all', 'lora_only'\)"),
    ("lora_dropout", 1.5, r"lora_dropout=1\.5 must be in \[0, 1\)"),
    ("init_lora_weights", "corda", r"init_lora_weights='corda' is not supported; use one of \(True, False, 'gaus"),
    ("compute_dtype", "int8", r"compute_dtype='int8' is not a dtype"),
])
def test_bad_fields_name_value_and_fix(field, value, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**{field: value})


def test_layer_filter_with_a_regex_target_is_refused():
    with pytest.raises(ValueError, match=r"layers_to_transform=\[0\] cannot be combined with the regex"):
        LoraConfig(target_modules=r".*q_proj", layers_to_transform=[0])


def test_layers_pattern_needs_layers_to_transform():
    with pytest.raises(ValueError, match=r"layers_pattern='layers' is only used with layers_to_transform"):
        LoraConfig(layers_pattern="layers")


def test_dtype_strings_are_parsed():
    config = LoraConfig(compute_dtype="bfloat16", adapter_dtype=torch.float16)
    assert config.compute_dtype is torch.bfloat16
    assert config.adapter_dtype is torch.float16


def test_rank_and_alpha_patterns_follow_peft_matching():
    config = LoraConfig(r=8, lora_alpha=16, rank_pattern={"q_proj": 4, r"layers\.1\.mlp\..*": 2},
                        alpha_pattern={"v_proj": 3})
    assert config.rank_for("model.layers.0.self_attn.q_proj") == 4
    assert config.rank_for("model.layers.1.mlp.up_proj") == 2
    assert config.rank_for("model.layers.0.mlp.up_proj") == 8
    assert config.rank_for("model.layers.0.self_attn.qq_proj") == 8          # a suffix after a dot only
    assert config.alpha_for("model.layers.0.self_attn.v_proj") == 3
    assert config.alpha_for("model.layers.0.self_attn.q_proj") == 16


def test_round_trip_through_json(tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2},
                        use_rslora=True, compute_dtype="bfloat16")
    path = config.save_pretrained(tmp_path)
    data = json.loads(path.read_text())
    assert "compute_dtype" not in data and data["peft_type"] == "LORA"
    again = LoraConfig.from_pretrained(tmp_path)
    assert again.to_dict() == config.to_dict()


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no adapter_config\.json in"):
        LoraConfig.from_pretrained(tmp_path)


@requires("peft")
def test_peft_reads_our_config_and_we_read_peft(tmp_path):
    import peft

    for ours in (
        LoraConfig(r=4, lora_alpha=8, target_modules=r".*\.(q|v)_proj", use_rslora=True, alpha_pattern={"v_proj": 2}),
        LoraConfig(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="layers", bias="all"),
    ):
        ours.save_pretrained(tmp_path / "ours")
        theirs = peft.LoraConfig.from_pretrained(tmp_path / "ours")
        for field in ("r", "lora_alpha", "use_rslora", "layers_to_transform", "layers_pattern", "alpha_pattern",
                      "bias"):
            assert getattr(theirs, field) == getattr(ours, field), field
        assert theirs.target_modules == (set(ours.target_modules) if isinstance(ours.target_modules, list)
                                         else ours.target_modules)

    peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], bias="lora_only").save_pretrained(tmp_path / "p")
    back = LoraConfig.from_pretrained(tmp_path / "p")
    assert (back.r, back.lora_alpha, back.target_modules, back.bias) == (2, 4, ["q_proj"], "lora_only")


def test_unimplemented_peft_features_are_refused():
    with pytest.raises(ValueError, match=r"sets \['use_qalora'\], which qlora_inject does not implement"):
        LoraConfig.from_dict({"r": 4, "use_qalora": True, "peft_version": "0.21"})


# One wrong value per field (every LoraConfig field appears at least once): the error names the field,
# the value, and what is expected.
BAD_VALUES = [
    ("r", "8", ValueError, r"r='8' must be a positive integer"),
    ("lora_alpha", "16", TypeError, r"lora_alpha='16' must be a number, not str"),
    ("lora_alpha", float("nan"), ValueError, r"lora_alpha=nan must be a finite number \(not nan or inf\)"),
    ("lora_alpha", float("inf"), ValueError, r"lora_alpha=inf must be a finite number"),
    ("lora_alpha", True, TypeError, r"lora_alpha=True must be a number, not bool"),
    ("lora_dropout", "0.1", TypeError, r"lora_dropout='0\.1' must be a number, not str, e\.g\. lora_dropout=0\.05"),
    ("lora_dropout", float("nan"), ValueError, r"lora_dropout=nan must be a finite number"),
    ("lora_dropout", 1.5, ValueError, r"lora_dropout=1\.5 must be in \[0, 1\)"),
    ("target_modules", [5], TypeError, r"target_modules=\[5\] holds 5, which is not a string"),
    ("target_modules", 5, TypeError, r"target_modules=5 must be a list of names or a regex string"),
    ("target_modules", "q_proj[", ValueError, r"target_modules='q_proj\[' is not a valid regular expression"),
    ("exclude_modules", [None], TypeError, r"exclude_modules=\[None\] holds None, which is not a string"),
    ("layers_to_transform", "abc", TypeError, r"layers_to_transform='abc' must be a layer index or a list of them"),
    ("layers_to_transform", [0, "1"], TypeError, r"layers_to_transform=\[0, '1'\] must be a layer index"),
    ("layers_to_transform", [-1], TypeError, r"layers_to_transform=\[-1\] must be a layer index .*non-negative"),
    ("layers_pattern", 3, TypeError, r"layers_pattern=3 must be a list of names or a regex string"),
    ("rank_pattern", {"q_proj": "x"}, ValueError, r"rank_pattern\['q_proj'\]='x' must be a positive integer"),
    ("rank_pattern", [("q_proj", 4)], TypeError, r"rank_pattern=\[\('q_proj', 4\)\] must be a dict"),
    ("rank_pattern", {4: 4}, TypeError, r"rank_pattern key 4 must be a string"),
    ("alpha_pattern", {"q_proj": "x"}, TypeError, r"alpha_pattern\['q_proj'\]='x' must be a number, not str"),
    ("alpha_pattern", {"q_proj": float("nan")}, ValueError, r"alpha_pattern\['q_proj'\]=nan must be a finite number"),
    ("alpha_pattern", {"q_proj": float("-inf")}, ValueError, r"alpha_pattern\['q_proj'\]=-inf must be a finite"),
    ("use_rslora", "yes", TypeError, r"use_rslora='yes' must be True or False \(a bool\)"),
    ("bias", None, TypeError, r"bias=None must be a string"),
    ("bias", "some", ValueError, r"bias='some' is not one of \('none', 'all', 'lora_only'\)"),
    ("modules_to_save", [1], TypeError, r"modules_to_save=\[1\] holds 1, which is not a string"),
    ("init_lora_weights", 1, ValueError, r"init_lora_weights=1 is not supported; use one of \(True, False"),
    ("init_lora_weights", "corda", ValueError, r"init_lora_weights='corda' is not supported; use one of \(True, "),
    ("fan_in_fan_out", "false", TypeError, r"fan_in_fan_out='false' must be True or False"),
    ("task_type", 1, TypeError, r"task_type=1 must be a string or None"),
    ("use_dora", "yes", TypeError, r"use_dora='yes' must be True or False \(a bool\), e\.g\. use_dora=True"),
    ("loftq_config", "nf4", TypeError, r"loftq_config='nf4' must be a dict"),
    ("base_model_name_or_path", 3, TypeError, r"base_model_name_or_path=3 must be a string or None"),
    ("inference_mode", 0, TypeError, r"inference_mode=0 must be True or False"),
    ("compute_dtype", "int8", ValueError, r"compute_dtype='int8' is not a dtype"),
    ("adapter_dtype", torch.int8, ValueError, r"adapter_dtype=torch\.int8 is not a float dtype"),
    ("peft_type", "IA3", ValueError, r"peft_type='IA3': only LoRA adapters"),
]


@pytest.mark.parametrize(("field", "value", "error", "message"), BAD_VALUES,
                         ids=[f"{f}={v!r}" for f, v, *_ in BAD_VALUES])
def test_every_field_is_type_and_value_checked(field, value, error, message):
    with pytest.raises(error, match=message):
        LoraConfig(**{field: value})


def test_the_bad_value_table_covers_every_field():
    import dataclasses

    assert {f.name for f in dataclasses.fields(LoraConfig)} == {field for field, *_ in BAD_VALUES}


def test_fields_are_checked_again_when_changed_after_construction():
    config = LoraConfig(target_modules=["q_proj"])
    config.lora_alpha = float("nan")
    with pytest.raises(ValueError, match=r"lora_alpha=nan must be a finite number"):
        config.validate()


def test_accepted_spellings_are_normalised():
    config = LoraConfig(target_modules=("v_proj", "q_proj"), layers_to_transform=3, layers_pattern=("layers",),
                        loftq_config=None, lora_alpha=16.0, alpha_pattern={"q_proj": 2}, task_type=None)
    assert config.target_modules == ["v_proj", "q_proj"]
    assert config.layers_to_transform == [3]
    assert config.layers_pattern == ["layers"]
    assert config.loftq_config == {}
    assert LoraConfig(target_modules={"v_proj", "q_proj"}).target_modules == ["q_proj", "v_proj"]
