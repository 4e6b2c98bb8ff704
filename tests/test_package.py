"""Packaging facts: imports with torch alone, kernels under qlora_inject only, the quickstart job."""

from __future__ import annotations

import subprocess
import sys


def run_python(code: str, cwd: str = "/") -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, check=True)
    return result.stdout.strip()


def test_import_needs_torch_alone():
    out = run_python(
        "import sys, qlora_inject, torch\n"
        "from qlora_inject import find_backend\n"
        "find_backend(torch.nn.Linear(2, 2))\n"
        "optional = ('bitsandbytes', 'transformers', 'peft', 'hqq', 'safetensors', 'triton', 'gptqmodel', 'awq')\n"
        "print(sorted(m for m in optional if m in sys.modules))"
    )
    assert out == "[]"


def test_kernels_live_under_qlora_inject_only():
    out = run_python(
        "import importlib.util, qlora_inject.kernels.dequant_4bit as d\n"
        "print(d.__name__, importlib.util.find_spec('kernels') is None or 'site-packages/kernels' in "
        "str(importlib.util.find_spec('kernels').origin))"
    )
    assert out == "qlora_inject.kernels.dequant_4bit True"


def test_every_name_readme_uses_with_qi_is_exported():
    import re
    from pathlib import Path

    import qlora_inject as qi

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    used = set(re.findall(r"\bqi\.([A-Za-z_]\w*)", readme))
    missing = sorted(name for name in used if name not in qi.__all__ and name != "distributed")
    assert used and not missing, f"README uses qi.{missing} which qlora_inject.__all__ does not export"
    assert all(hasattr(qi, name) for name in qi.__all__)


def test_readme_api_table_lists_exactly_what_the_package_exports():
    import re
    from pathlib import Path

    import qlora_inject as qi

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("\n## API\n", 1)[1].split("\n## ", 1)[0]
    listed = {name for row in section.splitlines() if row.startswith("| `")
              for name in re.findall(r"`(\w+)`", row.split(" | ")[0])}
    assert listed == set(qi.__all__), (f"README's API table lacks {sorted(set(qi.__all__) - listed)}, "
                                       f"lists unexported {sorted(listed - set(qi.__all__))}")
