"""`kimi-neuron golden` on the tiny Kimi-K2 FP8 checkpoint (real vocabulary): what it records,
and that a run killed mid-way resumes where it stopped and produces the same file."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_kimi_neuron.golden import Golden, GoldenError, generate, read_prompts
from vllm_kimi_neuron.reference import Batch, Reference

CLI = [str(Path(sys.executable).parent / "kimi-neuron")]
PROMPTS = [[163587, 370, 11, 552, 345, 342, 30, 163586], [5, 6], [1000, 2000, 3000, 4000, 5000]]


@pytest.fixture(scope="module")
def golden(tiny_fp8: Path, tmp_path_factory: pytest.TempPathFactory) -> Golden:
    return generate(tiny_fp8, PROMPTS, tmp_path_factory.mktemp("work"), max_new_tokens=3, top_k=5)


def _write_prompts(path: Path, prompts: list[list[int]]) -> Path:
    path.write_text("".join(json.dumps({"token_ids": p}) + "\n" for p in prompts))
    return path


def test_positions_are_teacher_forced_and_continuations_greedy(golden: Golden, tiny_fp8: Path) -> None:
    ref = Reference(tiny_fp8)
    sequences = [s.tokens for s in golden.sequences]
    slots = max(map(len, sequences))
    caches = [ref.new_cache(len(sequences), slots) for _ in range(ref.cfg.num_hidden_layers)]
    h, _ = ref.run(Batch.of(sequences), caches, absorb=False)  # one prefill over prompt + continuation
    logprobs = torch.log_softmax(ref.logits(h), -1)
    for b, seq in enumerate(golden.sequences):
        assert seq.prompt == PROMPTS[b] and len(seq.continuation) == 3
        assert len(seq.positions) == len(seq.tokens) - 1
        for t, pos in enumerate(seq.positions):
            expected = logprobs[b, t]
            assert pos.token == seq.tokens[t + 1]
            assert pos.logprob == pytest.approx(float(expected[pos.token]), abs=1e-4)
            assert pos.top_ids == expected.topk(5).indices.tolist()
            assert pos.top_logprobs == pytest.approx(expected.topk(5).values.tolist(), abs=1e-4)
        for j, token in enumerate(seq.continuation):  # each new token is the argmax before it
            assert token == seq.positions[len(seq.prompt) - 1 + j].top_ids[0]


def test_golden_file_round_trip_and_errors(golden: Golden, tmp_path: Path) -> None:
    golden.save(tmp_path / "g.json")
    assert Golden.load(tmp_path / "g.json") == golden
    raw = json.loads((tmp_path / "g.json").read_text())
    raw["sequences"][0]["positions"].pop()
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(GoldenError, match=r"bad\.json: sequence 0 has 11 tokens but 9 positions"):
        Golden.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(GoldenError, match="format is 'something-else'"):
        Golden.load(tmp_path / "other.json")


def test_prompt_file_errors_name_the_line(tiny_fp8: Path, tmp_path: Path) -> None:
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"token_ids": [1, 2]}\n\n{"prompt": "hi"}\n')
    with pytest.raises(GoldenError, match=r"p\.jsonl:3: expected"):
        read_prompts(bad, tiny_fp8)
    bad.write_text("not json\n")
    with pytest.raises(GoldenError, match=r"p\.jsonl:1: not JSON"):
        read_prompts(bad, tiny_fp8)


def test_work_dir_of_another_job_is_refused(tiny_fp8: Path, tmp_path: Path) -> None:
    generate(tiny_fp8, [[1, 2, 3]], tmp_path / "w", max_new_tokens=1, top_k=2)
    with pytest.raises(GoldenError, match="unfinished run for other prompts"):
        generate(tiny_fp8, [[1, 2, 4]], tmp_path / "w", max_new_tokens=1, top_k=2)


def test_prompt_only_golden_has_no_continuation(tiny_fp8: Path, tmp_path: Path, golden: Golden) -> None:
    only = generate(tiny_fp8, PROMPTS[:1], tmp_path / "w", max_new_tokens=0, top_k=5)
    assert only.sequences[0].continuation == []
    got = only.sequences[0].positions
    expected = golden.sequences[0].positions[: len(PROMPTS[0]) - 1]  # alone vs in a batch: float noise
    assert [(p.token, p.top_ids) for p in got] == [(p.token, p.top_ids) for p in expected]
    assert [p.logprob for p in got] == pytest.approx([p.logprob for p in expected], abs=1e-4)


def test_killed_run_resumes_at_its_layer_and_gives_the_same_file(tiny_fp8: Path, tmp_path: Path) -> None:
    prompts = _write_prompts(tmp_path / "p.jsonl", PROMPTS)
    args = [*CLI, "golden", "--model", str(tiny_fp8), "--prompts", str(prompts), "--max-new-tokens", "12",
            "--top-k", "4"]
    whole = subprocess.run([*args, "--out", str(tmp_path / "whole.json")], capture_output=True, text=True,
                           timeout=300)
    assert whole.returncode == 0, whole.stderr
    assert "[36/36] decode step 11/11, layer 3/3" in whole.stderr and "ETA" in whole.stderr

    out = tmp_path / "resumed.json"
    first = subprocess.Popen([*args, "--out", str(out)], stderr=subprocess.PIPE, text=True)
    assert first.stderr is not None
    for line in first.stderr:
        if "prefill, layer 2/3" in line:
            first.send_signal(signal.SIGKILL)
            break
    assert first.wait(timeout=60) == -signal.SIGKILL
    assert not out.exists() and (tmp_path / "resumed.json.work" / "state.safetensors").exists()

    second = subprocess.run([*args, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    resumed_at = second.stderr.split("resuming at step ", 1)[1].split(" |", 1)[0]  # "1/12, layer 2"
    step, layer = int(resumed_at.split("/")[0]), int(resumed_at.rsplit("layer ", 1)[1])
    assert (step, layer) >= (1, 2)  # did not start over
    assert Golden.load(out).sequences == Golden.load(tmp_path / "whole.json").sequences
    assert not (tmp_path / "resumed.json.work").exists()  # cleaned up once the file is written


def test_cli_reports_a_broken_checkpoint_without_traceback(tiny_fp8: Path, tmp_path: Path) -> None:
    prompts = _write_prompts(tmp_path / "p.jsonl", [[1, 2]])
    r = subprocess.run([*CLI, "golden", "--model", str(tmp_path), "--prompts", str(prompts),
                        "--out", str(tmp_path / "g.json")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "config.json not found" in r.stderr and "Traceback" not in r.stderr
