"""On a trn2 host: the tiny Kimi-K2 checkpoint, converted to neuron-fp8, compiled by NxDI on two
logical cores through `vllm serve`, against the CPU reference; then a decode-latency figure.

Not yet run on hardware (see README, "Validation on Trainium"). Everything the test uses is the
product path: the plugin's Neuron mode, the planner's defaults, the converter, check-accuracy.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from vllm_kimi_neuron.convert import convert
from vllm_kimi_neuron.launch import Server, ServeSpec, free_port

CLI = [str(Path(sys.executable).parent / "kimi-neuron")]
PROMPTS = [{"token_ids": [163584, 17, 3000, 42, 99, 100000, 5, 163601, 8, 8]},
           {"text": "The quick brown fox jumps over the lazy dog."}]
TP = 2


@pytest.fixture(scope="module")
def server(tiny_fp8: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    work = tmp_path_factory.mktemp("neuron")
    converted = convert(tiny_fp8, work / "neuron-fp8", "neuron-fp8", show_progress=False)
    os.environ["KIMI_NEURON_CHECKPOINT"] = str(converted)
    os.environ["KIMI_NEURON_HOME"] = str(work / "home")
    spec = ServeSpec(model=tiny_fp8, port=free_port(), max_model_len=512, cpu=False, extra_args=[
        "--tensor-parallel-size", str(TP), "--max-num-seqs", "4", "--num-gpu-blocks-override", "4",
        "--no-enable-prefix-caching"])
    with open(work / "server.log", "wb") as log:
        srv = Server(spec, log=log)
        try:
            srv.wait_ready(timeout=3600)  # the first start compiles
            yield srv
        finally:
            srv.stop()


@pytest.fixture(scope="module")
def golden(tiny_fp8: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("golden")
    (work / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    subprocess.run([*CLI, "golden", "--model", str(tiny_fp8), "--prompts", str(work / "prompts.jsonl"),
                    "--out", str(work / "golden.json"), "--max-new-tokens", "8"], check=True, timeout=600)
    return work / "golden.json"


def test_compiled_tiny_model_matches_the_cpu_reference(server: Server, golden: Path) -> None:
    r = subprocess.run([*CLI, "check-accuracy", "--base-url", server.spec.url, "--golden", str(golden)],
                       capture_output=True, text=True, timeout=600)
    print(r.stdout)
    assert r.returncode == 0 and r.stdout.rstrip().endswith("PASS"), r.stdout + r.stderr


def test_batched_decode_at_different_positions(server: Server) -> None:
    """Four concurrent greedy requests of different lengths decode as they do alone (the RoPE
    batch defect of earlier ports rotated every sequence by sequence 0's positions)."""
    prompts = [[163584, *range(100, 100 + n)] for n in (3, 17, 40, 9)]

    def complete(prompt: list[int]) -> list[int]:
        body = {"model": server.spec.served_model_name, "prompt": prompt, "max_tokens": 12,
                "temperature": 0, "ignore_eos": True, "return_tokens_as_token_ids": True, "logprobs": 1}
        out = httpx.post(server.spec.url + "/v1/completions", json=body, timeout=300).json()
        return [int(t.split(":")[1]) for t in out["choices"][0]["logprobs"]["tokens"]]

    alone = [complete(p) for p in prompts]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(complete, prompts))
    assert together == alone


def test_decode_latency(server: Server) -> None:
    """Prints per-token decode latency at batch 1 (a figure for the README table, not a gate)."""
    body = {"model": server.spec.served_model_name, "prompt": [163584, 17, 3000], "max_tokens": 128,
            "temperature": 0, "ignore_eos": True, "stream": True}
    stamps = []
    with httpx.stream("POST", server.spec.url + "/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                stamps.append(time.perf_counter())
    gaps = sorted(b - a for a, b in itertools.pairwise(stamps))
    assert len(gaps) >= 100
    print(f"tiny Kimi-K2 on {TP} logical cores, batch 1: TPOT p50 {gaps[len(gaps) // 2] * 1e3:.2f} ms, "
          f"p90 {gaps[int(len(gaps) * 0.9)] * 1e3:.2f} ms")
