"""Shared fixtures: one tiny Kimi-K2 checkpoint (FP8) and its BF16 copy per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vllm_kimi_neuron.convert import convert
from vllm_kimi_neuron.tiny import make_tiny

# Everything the tests load is made locally; a hub lookup would be a bug (and there is no network).
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def tiny_fp8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "fp8", seed=0)


@pytest.fixture(scope="session")
def tiny_bf16(tiny_fp8: Path) -> Path:
    return convert(tiny_fp8, tiny_fp8.parent / "bf16", "bf16", show_progress=False)
