"""What a merge keeps: held-out loss of base, adapter and merged model; the warning when the gain is lost."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from qlora_inject import LoraConfig, LoraModel, causal_lm_loss, pretrained, train
from qlora_inject.merge_report import MergeGain, MergeLossWarning, default_held_out, measure_merge

from conftest import requires

pytestmark = [requires("transformers"), requires("bitsandbytes")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return train.build_default_model(tmp_path_factory.mktemp("model") / "m", hidden=128, layers=1)


def trained(model_dir, quant: str, lr: float, batch: torch.Tensor) -> LoraModel:
    """A LoRA adapter fitted to `batch` by three AdamW steps (small `lr`: an update below NF4's rounding)."""
    model = LoraModel(pretrained.load_model(model_dir, quant), LoraConfig(r=4, target_modules="all-linear",
                                                                   lora_dropout=0.0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(3):
        causal_lm_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


@pytest.fixture(scope="module")
def batch():
    ids = torch.tensor(train.byte_tokens(train.read_corpus(None)))
    return torch.stack([ids[i * 128:(i + 1) * 128] for i in range(4)])


def test_a_merge_into_nf4_that_rounds_the_update_away_warns(model_dir, batch):
    model = trained(model_dir, "nf4", 1e-4, batch)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    gain = measure_merge(model, [(batch, batch)])
    assert gain.adapter < gain.base and gain.kept < 0.5, gain
    assert gain.warning("nf4").startswith(f"warning: merged into nf4, the model keeps {gain.kept:.0%} of the adapter")
    assert "--dequantize" in gain.warning("nf4")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())        # unmerged, as before
    with torch.no_grad():
        assert float(causal_lm_loss(model.eval(), batch)) == pytest.approx(gain.adapter, rel=1e-5)


def test_a_dense_merge_keeps_the_gain_and_does_not_warn(model_dir, batch):
    gain = measure_merge(trained(model_dir, "none", 1e-4, batch), [(batch, batch)])
    assert gain.kept == pytest.approx(1.0, abs=1e-3) and gain.warning() is None


def test_merge_adapter_given_held_out_data_reports_the_losses_and_warns_in_one_line(model_dir, batch):
    model = trained(model_dir, "nf4", 1e-4, batch)
    with pytest.warns(MergeLossWarning, match=r"^warning: merged into bnb-4bit, the model keeps -?\d+% .*--dequantize"):
        report = model.merge_adapter(held_out=[(batch, batch)])
    assert len(report) == 7 and all(0 < layer.relative_error < 1 for layer in report.values())   # per layer, as before
    assert report.gain.adapter < report.gain.base and report.gain.kept < 0.5, report.gain
    assert "\n" not in str(report.gain.warning())
    with torch.no_grad():                                                   # it stays merged, as merge_adapter does
        assert float(causal_lm_loss(model.eval(), batch)) == pytest.approx(report.gain.merged, rel=1e-5)


def test_merge_adapter_given_held_out_data_into_dense_keeps_the_gain_silently(model_dir, batch):
    model = trained(model_dir, "none", 1e-4, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MergeLossWarning)
        gain = model.merge_adapter(held_out=[(batch, batch)]).gain
    assert gain.adapter < gain.base and gain.kept == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(ValueError, match=r"active adapters \['default'\]; call set_adapter\(\['other'\]\) first"):
        model.merge_adapter(["other"], held_out=[(batch, batch)])


def test_gain_kept_is_measured_against_the_adapter_gain():
    assert MergeGain(3.04, 2.44, 2.84).kept == pytest.approx(1 / 3)                  # the SmolLM2 numbers
    assert "keeps 33% of the adapter's gain" in str(MergeGain(3.04, 2.44, 2.84))
    assert MergeGain(2.0, 2.1, 2.5).kept == 1.0 and MergeGain(2.0, 2.1, 2.5).warning() is None   # nothing to lose


def test_only_the_default_jobs_adapters_have_a_held_out_split(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "tiny"}))
    assert default_held_out(tmp_path) is None
    assert default_held_out(tmp_path / "missing") is None
