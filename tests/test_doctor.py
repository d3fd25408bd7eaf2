"""`doctor` on this machine (no Trainium, no Neuron SDK): it must say so, not crash."""

from __future__ import annotations

import json
from pathlib import Path

from vllm_kimi_neuron import artifacts, doctor
from vllm_kimi_neuron.neuron import hooks


def test_report_on_a_machine_without_neuron(tmp_path: Path) -> None:
    done = tmp_path / "0123456789abcdef"
    done.mkdir()
    (done / artifacts.MODEL_FILE).write_bytes(b"x")
    artifacts.mark_complete(done)
    (done / artifacts.KEY_FILE).write_text(json.dumps({"neuron_config": {"tp_degree": 64, "batch_size": 8}}))
    (tmp_path / "fedcba9876543210").mkdir()
    report = doctor.run([*hooks.PATCHES, *hooks.SELECTIVE_LOADING], lambda: "| weights | 16.0 GiB |",
                        tmp_path)
    text = report.text()
    assert "no Neuron devices (/dev/neuron*): this machine cannot serve on Trainium" in report.problems
    assert "vllm-neuron is not installed (need 0.5.0, Neuron SDK 2.29)" in report.problems
    assert "  patch 'vllm-neuron-kimi-model': vllm-neuron is not installed" in report.lines
    assert "0123456789abcdef: complete; tp_degree=64, batch_size=8" in text
    assert "fedcba9876543210: incomplete (no kimi_neuron_compiled.json: the compile did not finish)" in text
    assert "| weights | 16.0 GiB |" in text and text.rstrip().endswith(report.problems[-1])


def test_planner_refusal_is_reported_as_a_problem(tmp_path: Path) -> None:
    def refused() -> str:
        raise ValueError("does not fit: 31.2 GiB of weights per logical core, 24 GiB available")

    report = doctor.run([], refused, tmp_path / "absent")
    assert "does not fit: 31.2 GiB of weights per logical core, 24 GiB available" in report.problems
    assert "none yet: the first start compiles" in report.text()


def test_cli_reports_the_plan_and_refuses_one_that_does_not_fit() -> None:
    import subprocess
    import sys

    cli = str(Path(sys.executable).parent / "kimi-neuron")
    ok = subprocess.run([cli, "doctor", "--tp", "64", "--max-num-seqs", "8", "--max-model-len", "2048"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 1  # no Neuron devices or SDK here
    assert "## planned memory budget" in ok.stdout and "| headroom " in ok.stdout
    assert "does not fit" not in ok.stdout
    big = subprocess.run([cli, "doctor", "--tp", "64", "--max-num-seqs", "8", "--max-model-len", "32768"],
                         capture_output=True, text=True, timeout=120)
    assert big.returncode == 1
    assert "  - does not fit: " in big.stdout and "To fit: lower --max-model-len" in big.stdout
