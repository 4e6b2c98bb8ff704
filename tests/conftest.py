"""Shared test setup: a fixed seed, optional-dependency markers, and small models."""

from __future__ import annotations

import importlib.util

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def requires(package: str) -> pytest.MarkDecorator:
    """Skip when `package` cannot be imported, saying which package and how to get it."""
    return pytest.mark.skipif(
        importlib.util.find_spec(package) is None,
        reason=f"needs {package}: pip install -e '.[dev]' (or the extra that provides it)",
    )


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
