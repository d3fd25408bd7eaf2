"""`kimi-neuron bench --compare-without-plugin`: the tool starts two real `vllm serve` processes of the
tiny checkpoint, one without this plugin (VLLM_PLUGINS), runs them interleaved and reports ratios.
Checks that the setting took effect, the interleaving, and that every ratio is computed from the
numbers beside it. No timing is asserted."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

CLI = [str(Path(sys.executable).parent / "kimi-neuron"), "bench"]
REGISTERED = re.compile(r"vllm-kimi-neuron \S+ registered in pid \d+")


def test_plugin_loaded_vs_not_interleaved_with_ratios(tiny_bf16: Path, tmp_path: Path) -> None:
    r = subprocess.run([*CLI, "--serve", str(tiny_bf16), "--max-model-len", "256",
                        "--compare-without-plugin", "kimi_neuron", "--rounds", "2", "--concurrency", "1,2",
                        "--num-prompts", "2", "--input-len", "16", "--output-len", "6", "--warmup", "1",
                        "--max-tpot-ratio", "1.02",
                        "--out", str(tmp_path), "--no-progress"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["mode"] == "compare"
    base, other = result["targets"]
    assert (base["label"], other["label"]) == ("without kimi_neuron", "with kimi_neuron")
    assert "kimi_neuron" not in base["env"]["VLLM_PLUGINS"].split(",")
    assert "kimi_neuron" in other["env"]["VLLM_PLUGINS"].split(",")
    assert set(other["env"]["VLLM_PLUGINS"].split(",")) - set(base["env"]["VLLM_PLUGINS"].split(",")) == {
        "kimi_neuron"}
    assert (base["plugin_registered"], other["plugin_registered"]) == (False, True)
    assert not REGISTERED.search(Path(base["log"]).read_text())
    assert REGISTERED.search(Path(other["log"]).read_text())

    # Interleaved: each spec runs on both servers in turn, the order flipping every round.
    order = [(run["round"], run["value"], run["target"]) for run in result["runs"]]
    b, o = base["label"], other["label"]
    assert order == [(0, 1, b), (0, 1, o), (0, 2, b), (0, 2, o), (1, 1, o), (1, 1, b), (1, 2, o), (1, 2, b)]
    for run in result["runs"]:
        assert run["counts"] == {"sent": 2, "ok": 2, "truncated": 0, "lost": 0}
        assert run["tokens"]["output_ok"] == 12 and run["tokens"]["input_ok"] == 32
    for entry in result["summary"]:  # pooled over both rounds
        assert entry["counts"]["ok"] == 4 and entry["tokens"]["output_ok"] == 24
        runs = [x for x in result["runs"] if x["target"] == entry["target"] and x["value"] == entry["value"]]
        assert entry["duration_s"] == pytest.approx(sum(x["duration_s"] for x in runs))

    def p50(label: str, value: int, metric: str, rnd: int | None = None) -> float:
        entries = result["summary"] if rnd is None else [x for x in result["runs"] if x["round"] == rnd]
        (entry,) = [e for e in entries if e["target"] == label and e["value"] == value]
        return entry[metric]["p50"]

    for row in result["comparison"]:
        for metric, ratio in row["p50_ratio"].items():
            assert ratio == pytest.approx(p50(o, row["value"], metric) / p50(b, row["value"], metric))
        per_round = [p50(o, row["value"], "tpot_ms", rnd) / p50(b, row["value"], "tpot_ms", rnd)
                     for rnd in (0, 1)]
        assert row["tpot_p50_ratio_per_round"] == pytest.approx(per_round)
        median = sum(per_round) / 2
        assert row["tpot_p50_ratio_median_of_rounds"] == pytest.approx(median)
        assert row["goal"] == {"max_tpot_ratio": 1.02, "met": median <= 1.02}
    md = (tmp_path / "results.md").read_text()
    assert "## with kimi_neuron / without kimi_neuron\n" in md
    assert f"| c=1 | {p50(b, 1, 'tpot_ms'):.2f} | {p50(o, 1, 'tpot_ms'):.2f} |" in md
    verdicts = re.findall(r"median TPOT ratio <= 1.02: (met|MISSED) \|$", md, re.M)
    assert verdicts == ["met" if row["goal"]["met"] else "MISSED" for row in result["comparison"]]

    # Both servers were stopped with the tool.
    for target in (base, other):
        with pytest.raises(httpx.HTTPError):
            httpx.get(target["url"] + "/health", timeout=5)
