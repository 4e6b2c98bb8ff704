"""A format added as one file and one `register_backend` call (tests/toy_format.py) gets everything else:
the command's `--quant` choice, `quantize_model`, loading, `inspect`, the benchmark, LoRA training through
the fused op, and the tests parametrised over the registry's formats."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import toy_format

from qlora_inject import LoraConfig, LoraLinear, LoraModel
from qlora_inject.cli import build_parser, main
from qlora_inject.quantize import quantize_model
from qlora_inject.registry import format_for, quant_names

from factories import tiny_llama_dir

TESTS = Path(__file__).parent


@pytest.fixture
def toy():
    backend = toy_format.register()
    yield backend
    toy_format.unregister()


def test_a_registered_format_is_a_quant_choice_and_quantizes_a_model(toy):
    assert toy_format.NAME in quant_names() and format_for(toy_format.NAME) is toy
    args = build_parser().parse_args(["train", "--quant", toy_format.NAME, "--model", "tiny"])
    assert args.quant == toy_format.NAME
    from transformers import LlamaForCausalLM

    model = quantize_model(LlamaForCausalLM.from_pretrained(tiny_llama_dir()), toy_format.NAME)
    quantized = [name for name, m in model.named_modules() if isinstance(m, toy_format.ToyInt4Linear)]
    assert len(quantized) == 7 * model.config.num_hidden_layers                # every linear but the head
    assert type(model.lm_head) is torch.nn.Linear


def test_a_registered_format_loads_and_trains_lora_through_the_fused_op(toy, monkeypatch):
    from qlora_inject import lora
    from qlora_inject.pretrained import load_model

    calls = []
    original = lora.fused_lora_linear
    monkeypatch.setattr(lora, "fused_lora_linear", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = LoraModel(load_model(tiny_llama_dir(), toy_format.NAME),
                      LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert len(layers) == 7 * model.config.num_hidden_layers and {layer.backend.name for layer in layers} == {toy.name}
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and len(calls) == len(layers)                 # every layer through the fused op
    assert all(layer.lora_B["default"].weight.grad.abs().sum() > 0 for layer in layers)


def test_inspect_and_bench_list_a_registered_format(toy, capsys, tmp_path):
    assert main(["inspect", "tiny", "--quant", toy_format.NAME, "--target-modules", "q_proj"]) == 0
    out = capsys.readouterr().out
    row = r"\| model\.layers\.0\.self_attn\.q_proj \| ToyInt4Linear \| toy4 \| toy-int4 \| \d+ \| \d+ \| yes \|"
    assert re.search(row, out), out
    from qlora_inject.bench import LayerWorkload, run_layer_benchmark

    results = run_layer_benchmark(LayerWorkload(in_features=64, out_features=32, tokens=4, repeat=1,
                                                formats=("dense", toy_format.NAME)))
    assert [row.fmt for row in results] == ["dense", toy_format.NAME] and results[1].ours_s > 0
    assert main(["bench", "--formats", f"dense,{toy_format.NAME}", "--output", str(tmp_path)]) == 0
    assert f"| {toy_format.NAME} |" in (tmp_path / "layer.md").read_text()


def test_the_format_parametrised_tests_run_on_a_registered_format():
    """The suites parametrised over the registry's formats, run with the toy format registered as a plugin."""
    suites = ["test_lifecycle.py", "test_fused.py", "test_dora.py", "test_init_schemes.py"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "pytest", "-rA", "-p", "toy_format", "-k", toy_format.NAME,
                             "-p", "no:cacheprovider", *suites], cwd=TESTS, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    passed = re.findall(rf"^PASSED (test_\w+\.py)::\w+\[{toy_format.NAME}[\]-]", result.stdout, re.MULTILINE)
    assert set(passed) == set(suites) and len(passed) >= 8, result.stdout[-3000:]
