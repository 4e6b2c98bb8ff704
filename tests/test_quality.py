"""The cross-format quality benchmark: the default job per format, on a tiny model with a character tokenizer."""

from __future__ import annotations

import functools
import math
import shutil

import pytest

from qlora_inject import date_task, quality, train

from conftest import requires
from factories import tiny_llama_dir

pytestmark = [requires("transformers"), requires("bitsandbytes"), requires("tokenizers")]


@pytest.fixture
def one_thread():
    """One intra-op thread: on a loaded 2-core machine, two threads make each of the tiny model's matmuls
    wait on the other (3 ms instead of 15 µs measured), and this test would take a minute."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_date_job(monkeypatch, tmp_path, one_thread):
    """The default job on the tiny Llama (its 128 ids hold every character of the date task), 12 held-out dates."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    train_examples, held_out = date_task.make_split(train_size=64, held_out_size=12)
    text = "".join(e.prompt + e.answer for e in train_examples + held_out) + "".join(date_task.MONTHS) + "0123456789"
    vocab = {"<unk>": 0, "<pad>": 1, "<eos>": 2} | {c: i + 3 for i, c in enumerate(sorted(set(text)))}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    model_dir = shutil.copytree(tiny_llama_dir(), tmp_path / "tiny")
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", pad_token="<pad>",
                            eos_token="<eos>").save_pretrained(model_dir)
    monkeypatch.setattr(train, "model_source", lambda model: model_dir)
    monkeypatch.setattr(train, "DateTask", functools.partial(date_task.DateTask, train_size=64, held_out_size=12))
    return model_dir


def test_every_format_asked_for_has_a_row_of_finite_numbers_and_a_dense_merge_keeps_the_tuned_loss(
        tiny_date_job, tmp_path):
    workload = quality.QualityWorkload(formats=("dense", "nf4"), steps=3, own_process=False)   # dense: "none"
    results, failures = quality.run_quality(workload, log=lambda line: None)
    assert [r.quant for r in results] == ["none", "nf4"] and failures == {}
    for r in results:
        losses = (r.base_loss, r.tuned_loss, r.merged_loss, r.dense_merged_loss, r.reloaded_loss)
        assert all(math.isfinite(value) and value > 0 for value in losses), r
        assert r.tuned_loss < r.base_loss, r                                   # three steps at lr 3e-3 help
        assert r.reloaded_loss == pytest.approx(r.tuned_loss, rel=1e-4)         # the saved adapter is the trained one
        assert r.dense_merged_loss == pytest.approx(r.tuned_loss, rel=1e-4)     # a dense merge loses nothing
        assert r.tokens_per_second > 0 and r.adapter_mib > 0 and r.train_seconds > 0
        assert r.peak_rss_mib is None or r.peak_rss_mib >= 0
    dense, nf4 = results
    assert dense.merged_loss == pytest.approx(dense.tuned_loss, rel=1e-4) and dense.kept == pytest.approx(1, abs=1e-3)
    assert nf4.base_loss != dense.base_loss                                     # NF4 changed the model
    assert nf4.adapter_mib == pytest.approx(dense.adapter_mib)                  # the same LoRA shapes
    assert "bitsandbytes NF4" in nf4.quantizer

    text = quality.save_quality(tmp_path / "out", workload, results, {"awq": "the awq run failed\n(exit status 1)"})
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 2 and all(line.count("|") == len(quality.COLUMNS) + 1 for line in table)
    assert table[2].startswith(f"| none | not quantized | {dense.base_loss:.3f} |")
    assert table[3].startswith(f"| nf4 | {nf4.quantizer} | {nf4.base_loss:.3f} |")
    assert "awq failed: the awq run failed (exit status 1)" in text
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"quality.md", "quality.png", "quality.json"}


def test_an_unknown_format_is_refused_before_anything_runs():
    with pytest.raises(ValueError, match=r"unknown format 'nf5'; choose one of .*nf4"):
        quality.run_quality(quality.QualityWorkload(formats=("dense", "nf5")))


def test_the_formats_are_every_registered_one_dense_first():
    from qlora_inject.registry import quant_names

    formats = quality.quality_formats()
    assert formats[0] == "none" and sorted(formats) == sorted(quant_names())


def test_bench_quality_runs_the_quality_benchmark_with_the_formats_steps_and_threads_given(monkeypatch, tmp_path,
                                                                                            capsys):
    from qlora_inject.cli import main

    ran = []
    monkeypatch.setattr(quality, "benchmark", lambda workload, output: ran.append((workload, output)) or "the report")
    assert main(["bench", "--quality", "--formats", "none,nf4", "--steps", "2", "--threads", "1",
                 "--output", str(tmp_path)]) == 0
    assert ran == [(quality.QualityWorkload(formats=("none", "nf4"), steps=2, threads=1), tmp_path)]
    assert capsys.readouterr().out.startswith("the report")
    main(["bench", "--quality", "--output", str(tmp_path)])
    assert ran[-1][0] == quality.QualityWorkload(formats=quality.quality_formats())          # every format, 30 steps
