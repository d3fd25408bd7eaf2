"""Subprocesses of the Neuron-on-CPU tests: one process (sharding) or torchrun ranks (execution),
with the host environment NxD needs and each run's output kept in a log that a failure shows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def host_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PJRT_DEVICE": "CPU", "NEURON_PLATFORM_TARGET_OVERRIDE": "trn2", "PYTHONWARNINGS": "ignore",
                "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    return env


def run(args: list[str], log: Path, timeout: float = 600, extra_env: dict[str, str] | None = None) -> None:
    """A subprocess with its output kept in ``log``; a failure shows the log's tail."""
    with log.open("wb") as f:
        proc = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT,
                              env={**host_env(), **(extra_env or {})}, timeout=timeout, check=False)
    if proc.returncode:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if "warn" not in ln.lower()]
        tail = "\n".join(lines[-40:])
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}; log {log}:\n{tail}")


_ports = iter(range(29700, 29900))


def torchrun(nproc: int, script: Path, args: list[str], log: Path) -> None:
    run([str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", str(nproc),
         "--master-port", str(next(_ports)), str(script), *args], log)
