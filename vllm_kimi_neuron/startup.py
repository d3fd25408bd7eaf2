"""Startup progress of a vLLM server: phases with counts and ETA, a status file, stall detection,
and systemd's notify protocol.

A Kimi-K2 start (conversion, compile, loading about 1 TB) takes tens of minutes to over an hour, and
vLLM's API server does not answer HTTP meanwhile. This module makes that time visible and lets a
supervisor tell a slow start from a stuck or failed one.

Who does what: vLLM runs ``register()`` in every process. The process running ``vllm serve`` (the
API server: systemd's main PID, a container's PID 1) is the *owner*. It holds the state, logs it,
writes the status file (``kimi-neuron status`` reads it), speaks sd_notify, declares READY=1 once its
own ``/health`` answers, and watches for stalls. Every other vLLM process (engine core, workers)
inherits two environment variables from the owner and sends it its phase events as datagrams over
a private unix socket; so only the main PID ever talks to systemd and ``NotifyAccess=main`` holds.

Code that knows about a phase (the Neuron hooks: converting, compiling) calls::

    with startup.phase("compiling", total=n_graphs, unit="graphs") as p:
        ...
        p.advance()      # or p.tick() where there is nothing to count but the work goes on

from any process; an exception leaving the block is reported as the start's failure. Outside a
``vllm serve`` it only logs.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import os
import signal
import socket
import struct
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Literal

from .patches import Patch

logger = logging.getLogger("vllm.kimi_neuron")

# Phase ids (what code passes to phase()) and the words operators read.
PHASES = {
    "resolving": "resolving model",
    "converting": "converting/sharding checkpoint",
    "compiling": "compiling",
    "loading": "loading weights",
    "warming-up": "warm-up",
}
State = Literal["starting", "stalled", "ready", "stopping", "stopped", "failed"]
TERMINAL = ("stopped", "failed")

# `kimi-neuron status` exit codes, one per state (2 is argparse's and "no status file").
EXIT_CODES: dict[str, int] = {"ready": 0, "failed": 1, "starting": 3, "stalled": 4, "stopping": 5,
                              "stopped": 5}
EXIT_NO_STATUS = 2

ENV_ENABLE = "KIMI_NEURON_STARTUP"  # "0" turns all of this off
ENV_STATUS_FILE = "KIMI_NEURON_STATUS_FILE"
ENV_STALL_TIMEOUT = "KIMI_NEURON_STALL_TIMEOUT_S"
ENV_STALL_ACTION = "KIMI_NEURON_STALL_ACTION"
ENV_HEARTBEAT = "KIMI_NEURON_HEARTBEAT_S"
ENV_HEALTH_URL = "KIMI_NEURON_HEALTH_URL"
# Set by the owner for the processes vLLM starts under it.
ENV_HUB = "KIMI_NEURON_STARTUP_HUB"
ENV_OWNER = "KIMI_NEURON_STARTUP_OWNER"

DEFAULT_STALL_TIMEOUT_S = 1200.0
DEFAULT_HEARTBEAT_S = 15.0
# How long a stalled process given the "exit" action may take to stop on SIGTERM before it is ended.
STALL_EXIT_GRACE_S = 60.0
PROGRESS_LOG_EVERY_S = 30.0
FILE_WRITE_EVERY_S = 1.0
CHILD_SEND_EVERY_S = 0.5
# Share of one core below which a phase without counts is not taken to be working.
BUSY_MIN_CORES = 0.1


class StartupConfigError(ValueError):
    """A KIMI_NEURON_* setting that cannot be used; the message names it and the fix."""


def _now() -> float:
    return time.monotonic()


def _emit(level: int, message: str) -> None:
    """Log through vLLM's logger once it is configured, to stderr before that (the API server
    loads plugins before vLLM sets up logging)."""
    if logger.hasHandlers():
        logger.log(level, message)
    else:
        print(f"{logging.getLevelName(level)} {message}", file=sys.stderr, flush=True)


def _format_s(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


# ---------------------------------------------------------------------------------------------
# Settings


def default_status_file(env: Mapping[str, str] = os.environ) -> Path:
    """``$KIMI_NEURON_STATUS_FILE``, else ``$RUNTIME_DIRECTORY/status.json`` (systemd's
    RuntimeDirectory=), else ``$KIMI_NEURON_HOME/status.json``."""
    if env.get(ENV_STATUS_FILE):
        return Path(env[ENV_STATUS_FILE])
    if env.get("RUNTIME_DIRECTORY"):
        # systemd may list several directories separated by colons; the first is ours.
        return Path(env["RUNTIME_DIRECTORY"].split(":")[0]) / "status.json"
    home = env.get("KIMI_NEURON_HOME") or str(Path.home() / ".cache" / "vllm-kimi-neuron")
    return Path(home) / "status.json"


def _positive(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise StartupConfigError(f"{name}={raw!r} is not a positive number of seconds; set it to e.g. "
                                 f"{default:g}, or unset it for the default ({default:g})")
    return value


@dataclass(frozen=True)
class Settings:
    status_file: Path
    stall_timeout_s: float
    stall_action: Literal["report", "exit"]
    heartbeat_s: float
    health_url: str | None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        action = env.get(ENV_STALL_ACTION) or "report"
        if action not in ("report", "exit"):
            raise StartupConfigError(
                f"{ENV_STALL_ACTION}={action!r}: use 'report' (log it, set the status, stop extending "
                "systemd's start timeout) or 'exit' (also stop the server)")
        return cls(
            status_file=default_status_file(env),
            stall_timeout_s=_positive(env, ENV_STALL_TIMEOUT, DEFAULT_STALL_TIMEOUT_S),
            stall_action=action,  # type: ignore[arg-type]
            heartbeat_s=_positive(env, ENV_HEARTBEAT, DEFAULT_HEARTBEAT_S),
            health_url=env.get(ENV_HEALTH_URL) or None,
        )


# ---------------------------------------------------------------------------------------------
# sd_notify, spoken directly: one datagram of newline-separated KEY=VALUE lines to $NOTIFY_SOCKET.


def notify_address(value: str) -> str | None:
    """The socket address for a NOTIFY_SOCKET value: a path, or '@name' for the abstract namespace."""
    if value.startswith("/"):
        return value
    if value.startswith("@"):
        return "\0" + value[1:]
    return None


class Notifier:
    """Sends sd_notify messages; does nothing when NOTIFY_SOCKET is not set."""

    def __init__(self, env: Mapping[str, str] = os.environ) -> None:
        raw = env.get("NOTIFY_SOCKET", "")
        self.address = notify_address(raw) if raw else None
        if raw and self.address is None:
            _emit(logging.WARNING, f"vllm-kimi-neuron: NOTIFY_SOCKET={raw!r} is neither a path nor an "
                                   "@abstract name; not notifying systemd")
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        # WATCHDOG_PID, when set, names the one process the watchdog is meant for.
        mine = not pid or pid == str(os.getpid())
        self.watchdog_s = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and mine else None
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        if self.address is None:
            return False
        payload = "\n".join(lines).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(payload, self.address)
            return True
        except OSError as exc:
            if not self._warned:
                self._warned = True
                _emit(logging.WARNING, f"vllm-kimi-neuron: cannot notify systemd at NOTIFY_SOCKET: {exc}")
            return False


# ---------------------------------------------------------------------------------------------
# The owner's state


@dataclass
class _PhaseRecord:
    phase: str
    started: float  # monotonic
    pid: int


class Tracker:
    """The owner's view of the start: phases, progress, stalls, readiness, shutdown."""

    def __init__(self, settings: Settings, notifier: Notifier,
                 process_started_unix: float | None = None) -> None:
        self.settings = settings
        self.notifier = notifier
        self._lock = threading.RLock()
        self.pid = os.getpid()
        self.state: State = "starting"
        self.current: _PhaseRecord | None = None
        self.done = 0
        self.total: int | None = None
        self.unit = ""
        self.error: str | None = None
        self.health_url: str | None = None
        self.history: list[dict[str, Any]] = []
        # Count from the process's own start: importing vLLM and torch is part of the wait.
        self.started_unix = process_started_unix or time.time()
        self.started = _now() - max(0.0, time.time() - self.started_unix)
        self.last_progress = _now()
        self.ready_after_s: float | None = None
        self.note = ""
        self._last_write = 0.0
        self._last_progress_log = 0.0
        self._last_heartbeat = 0.0
        self._last_watchdog = 0.0
        self._sent_status = ""
        self._sent_key: tuple[str, str | None] = ("", None)
        self._last_status_at = 0.0
        self._stopping_sent = False
        self._write_warned = False

    # -- events -------------------------------------------------------------------------------

    def begin(self, phase: str, total: int | None = None, done: int = 0, unit: str = "",
              pid: int | None = None) -> None:
        with self._lock:
            if self.state not in ("starting", "stalled"):
                return
            now = _now()
            if self.current is not None and self.current.phase == phase:
                # The same phase reported again (e.g. with its total, once known): not a restart.
                if total is not None:
                    self.total = total
                if unit:
                    self.unit = unit
                self.done = max(self.done, done)
                self._progressed(now)
                self._publish(force_file=True)
                return
            self._close_phase(now)
            self.current = _PhaseRecord(phase, now, pid or os.getpid())
            self.done, self.total, self.unit = done, total, unit
            self._progressed(now)
            _emit(logging.INFO, f"vllm-kimi-neuron startup: {self._describe(now)}")
            self._last_progress_log = now
            self._publish(force_file=True)

    def progress(self, done: int | None = None, advance: int = 0, total: int | None = None) -> None:
        with self._lock:
            if self.state not in ("starting", "stalled") or self.current is None:
                return
            if total is not None:
                self.total = total
            new = (done if done is not None else self.done) + advance
            now = _now()
            if new != self.done or total is not None:
                self.done = new
                self._progressed(now)
            if now - self._last_progress_log >= PROGRESS_LOG_EVERY_S:
                self._last_progress_log = now
                _emit(logging.INFO, f"vllm-kimi-neuron startup: {self._describe(now)}")
            self._publish()

    def tick(self) -> None:
        """A sign of life from a phase that has nothing to count (e.g. a compiler still writing)."""
        with self._lock:
            if self.state in ("starting", "stalled"):
                self._progressed(_now())
                self._publish()

    def fail(self, cause: str) -> None:
        with self._lock:
            if self.state in TERMINAL:
                return
            now = _now()
            where = f" in {PHASES.get(self.current.phase, self.current.phase)}" if self.current else ""
            self.error = cause
            self.state = "failed"
            self._close_phase(now)
            _emit(logging.ERROR, f"vllm-kimi-neuron startup: failed{where} after "
                                 f"{_format_s(now - self.started)}: {cause}")
            self.note = f"failed{where}: {cause}"
            self._publish(force_file=True)

    def mark_ready(self, url: str) -> None:
        with self._lock:
            if self.state not in ("starting", "stalled"):
                return
            now = _now()
            self._close_phase(now)
            self.state = "ready"
            self.health_url = url
            self.ready_after_s = now - self.started
            phases = ", ".join(f"{PHASES.get(h['phase'], h['phase'])} {_format_s(h['seconds'])}"
                               for h in self.history)
            self.note = f"ready: {url} answers after {_format_s(self.ready_after_s)} ({phases})"
            _emit(logging.INFO, f"vllm-kimi-neuron startup: {self.note}")
            self._send_status(self.note, "READY=1")
            self._publish(force_file=True)

    def mark_stopping(self, detail: str) -> None:
        with self._lock:
            if self.state in TERMINAL or self.state == "stopping":
                return
            self._close_phase(_now())
            self.state = "stopping"
            self.note = f"stopping: {detail}"
            _emit(logging.INFO, f"vllm-kimi-neuron: {self.note}")
            self._send_stopping()
            self._publish(force_file=True)

    def mark_stopped(self, detail: str) -> None:
        with self._lock:
            if self.state in TERMINAL:
                return
            self._close_phase(_now())
            self.state = "stopped"
            self.note = f"stopped: {detail}"
            self._send_stopping()
            self._publish(force_file=True)

    # -- periodic work (the monitor thread) ----------------------------------------------------

    def heartbeat(self) -> None:
        """Stall check, systemd timeout extension and a status-file refresh, while starting."""
        with self._lock:
            now = _now()
            if self.state not in ("starting", "stalled"):
                return
            idle = now - self.last_progress
            if self.state == "starting" and idle > self.settings.stall_timeout_s:
                self._stall(now, idle)
                return
            if self.state == "starting" and now - self._last_heartbeat >= self.settings.heartbeat_s:
                self._last_heartbeat = now
                # Extend systemd's start timeout to the moment this start would count as stalled
                # (plus two heartbeats, so "stalled" is visible before systemd acts): a start
                # that keeps making progress is never killed, one that stops is.
                left = self.settings.stall_timeout_s - idle + 2 * self.settings.heartbeat_s
                self.notifier.send(f"EXTEND_TIMEOUT_USEC={int(left * 1e6)}")
            self._publish(force_file=now - self._last_write >= self.settings.heartbeat_s)

    def watchdog_due(self) -> bool:
        period = self.notifier.watchdog_s
        with self._lock:
            return (self.state == "ready" and period is not None
                    and _now() - self._last_watchdog >= period)

    def watchdog(self) -> None:
        with self._lock:
            self._last_watchdog = _now()
            self.notifier.send("WATCHDOG=1")

    # -- internals ---------------------------------------------------------------------------

    def _progressed(self, now: float) -> None:
        self.last_progress = now
        if self.state == "stalled":
            self.state = "starting"
            _emit(logging.WARNING, f"vllm-kimi-neuron startup: progress again after a stall: "
                                   f"{self._describe(now)}")

    def _stall(self, now: float, idle: float) -> None:
        self.state = "stalled"
        label = PHASES.get(self.current.phase, self.current.phase) if self.current else "startup"
        self.note = (f"stalled: no progress in {label} for {_format_s(idle)} "
                     f"({ENV_STALL_TIMEOUT}={self.settings.stall_timeout_s:g})")
        _emit(logging.WARNING, f"vllm-kimi-neuron startup: {self.note}")
        self._publish(force_file=True)
        if self.settings.stall_action == "exit":
            self.fail(self.note)
            _emit(logging.ERROR, f"vllm-kimi-neuron: stopping the server ({ENV_STALL_ACTION}=exit)")
            # vLLM turns SIGTERM into an orderly stop; if it cannot act (stuck in native code),
            # the process ends anyway after a grace period.
            ender = threading.Timer(STALL_EXIT_GRACE_S, os._exit, (1,))
            ender.daemon = True
            ender.start()
            os.kill(os.getpid(), signal.SIGTERM)

    def _close_phase(self, now: float) -> None:
        if self.current is None:
            return
        entry: dict[str, Any] = {"phase": self.current.phase, "label": PHASES.get(self.current.phase),
                                 "pid": self.current.pid, "seconds": round(now - self.current.started, 3)}
        if self.total is not None or self.done:
            entry.update(done=self.done, total=self.total, unit=self.unit)
        self.history.append(entry)
        self.current = None

    def _eta(self, now: float) -> float | None:
        if self.current is None or not self.total or self.done <= 0 or self.done >= self.total:
            return None
        elapsed = now - self.current.started
        return elapsed / self.done * (self.total - self.done)

    def _describe(self, now: float) -> str:
        if self.current is None:
            return self.note or self.state
        text = PHASES.get(self.current.phase, self.current.phase)
        if self.total:
            pct = 100.0 * self.done / self.total
            text += f" {self.done}/{self.total} {self.unit}".rstrip() + f" ({pct:.0f}%)"
        elif self.done:
            text += f" {self.done} {self.unit}".rstrip()
        eta = self._eta(now)
        if eta is not None:
            text += f", ETA {_format_s(eta)}"
        text += f", {_format_s(now - self.current.started)} in this phase"
        if self.state == "stalled":
            text = f"{self.note} [{text}]"
        return text

    def message(self) -> str:
        with self._lock:
            if self.state == "starting":
                return f"starting: {self._describe(_now())}"
            return self.note

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            now = _now()
            cur = self.current
            return {
                "schema": 1,
                "state": self.state,
                "message": self.message(),
                "phase": cur.phase if cur else None,
                "phase_label": PHASES.get(cur.phase) if cur else None,
                "phase_pid": cur.pid if cur else None,
                "done": self.done if cur else None,
                "total": self.total if cur else None,
                "unit": self.unit if cur else None,
                "eta_s": self._eta(now),
                "phase_elapsed_s": round(now - cur.started, 3) if cur else None,
                "since_progress_s": round(now - self.last_progress, 3),
                "stall_timeout_s": self.settings.stall_timeout_s,
                "elapsed_s": round(now - self.started, 3),
                "ready_after_s": self.ready_after_s,
                "error": self.error,
                "health_url": self.health_url,
                "history": list(self.history),
                "pid": self.pid,
                "started_unix": self.started_unix,
                "updated_unix": time.time(),
            }

    def _send_stopping(self) -> None:
        if not self._stopping_sent:
            self._stopping_sent = True
            self._send_status(self.note, "STOPPING=1")

    def _publish(self, force_file: bool = False) -> None:
        """STATUS= at once when the state or phase changes, progress text at most once a heartbeat;
        the status file at most once a second unless forced."""
        now = _now()
        msg = self.message()
        key = (self.state, self.current.phase if self.current else None)
        if msg != self._sent_status and (key != self._sent_key
                                         or now - self._last_status_at >= self.settings.heartbeat_s):
            self._send_status(msg)
        if force_file or now - self._last_write >= FILE_WRITE_EVERY_S:
            self._write(now)

    def _send_status(self, msg: str, *extra: str) -> None:
        self.notifier.send(*extra, "STATUS=" + msg)
        self._sent_status = msg
        self._sent_key = (self.state, self.current.phase if self.current else None)
        self._last_status_at = _now()

    def _write(self, now: float) -> None:
        self._last_write = now
        path = self.settings.status_file
        try:
            write_status(path, self.snapshot())
        except OSError as exc:
            if not self._write_warned:
                self._write_warned = True
                _emit(logging.WARNING, f"vllm-kimi-neuron: cannot write the status file {path}: {exc}; "
                                       f"set {ENV_STATUS_FILE} to a writable path")


def write_status(path: Path, status: dict[str, Any]) -> None:
    """Atomically: readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(status, indent=1) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
# Readiness: the owner probes its own /health


def probe(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def own_health_urls() -> list[str]:
    """``/health`` on every TCP port this process listens on (vLLM binds its socket before the
    engine starts and serves it once the engine is up); wildcard addresses become loopback."""
    import psutil  # a vLLM dependency; only the owner, a vLLM API server, gets here

    urls = []
    for conn in psutil.Process().net_connections(kind="tcp"):
        if conn.status != psutil.CONN_LISTEN or not conn.laddr:
            continue
        host, port = conn.laddr.ip, conn.laddr.port
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        urls.append(f"http://[{host}]:{port}/health" if ":" in host else f"http://{host}:{port}/health")
    return urls


class _Owner:
    """The owner's threads: the hub receiving other processes' events, and the monitor."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self.stop = threading.Event()
        self.hub = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # Abstract namespace: nothing on disk to clean up, private to this network namespace.
        name = f"kimi-neuron-startup-{os.getpid()}-{os.urandom(4).hex()}"
        self.hub.bind("\0" + name)
        self.hub_name = "@" + name

    def start(self) -> None:
        for target, name in ((self._receive, "kimi-neuron-startup-hub"),
                             (self._monitor, "kimi-neuron-startup-monitor")):
            threading.Thread(target=target, name=name, daemon=True).start()

    def _receive(self) -> None:
        while not self.stop.is_set():
            try:
                data = self.hub.recv(65536)
            except OSError:
                return
            self.apply(data)

    def drain(self) -> None:
        """Apply events already queued (e.g. an engine core's failure cause before our own)."""
        while True:
            try:
                data = self.hub.recv(65536, socket.MSG_DONTWAIT)
            except OSError:
                return
            self.apply(data)

    def apply(self, data: bytes) -> None:
        try:
            event = json.loads(data)
            op = event["op"]
        except (ValueError, KeyError, TypeError):
            return
        t = self.tracker
        if op == "phase":
            t.begin(event["phase"], event.get("total"), event.get("done", 0), event.get("unit", ""),
                    event.get("pid"))
        elif op == "progress":
            t.progress(event.get("done"), event.get("advance", 0), event.get("total"))
        elif op == "tick":
            t.tick()
        elif op == "fail":
            t.fail(str(event.get("cause")))

    def _monitor(self) -> None:
        t = self.tracker
        while not self.stop.wait(0.5):
            if t.state in ("starting", "stalled"):
                t.heartbeat()
                url = self._healthy_url()
                if url is not None:
                    t.mark_ready(url)
            # Only a server that still answers /health keeps systemd's watchdog fed.
            elif t.watchdog_due() and t.health_url is not None and probe(t.health_url, timeout=2.0):
                t.watchdog()

    def _healthy_url(self) -> str | None:
        urls = [self.tracker.settings.health_url] if self.tracker.settings.health_url else own_health_urls()
        return next((u for u in urls if probe(u)), None)


# ---------------------------------------------------------------------------------------------
# The API every process uses


_tracker: Tracker | None = None
_owner: _Owner | None = None
_hub_sender: socket.socket | None = None


def _send_to_owner(event: dict[str, Any]) -> None:
    """Deliver an event: to the tracker in the owner, over the hub elsewhere, else just log it."""
    global _hub_sender
    if _tracker is not None:
        if _owner is not None:
            _owner.apply(json.dumps(event).encode())
        return
    hub = os.environ.get(ENV_HUB)
    if hub:
        address = notify_address(hub)
        try:
            if _hub_sender is None:
                _hub_sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            _hub_sender.sendto(json.dumps({**event, "pid": os.getpid()}).encode(), address)
            return
        except OSError:
            pass  # the owner is gone; its own exit is reported by its parent
    if event["op"] in ("phase", "fail"):
        what = event.get("phase") or f"failed: {event.get('cause')}"
        _emit(logging.INFO, f"vllm-kimi-neuron startup: {PHASES.get(what, what)}")


class Phase:
    """A handle on the current phase; a ``with`` block reports an exception as the start's failure."""

    def __init__(self, name: str, total: int | None, done: int, unit: str) -> None:
        self.name = name
        self.total = total
        self.done = done
        self._last_sent = _now()
        self._unsent = False
        _send_to_owner({"op": "phase", "phase": name, "total": total, "done": done, "unit": unit})

    def advance(self, n: int = 1) -> None:
        self.update(done=self.done + n)

    def update(self, done: int | None = None, total: int | None = None) -> None:
        if done is not None:
            self.done = done
        if total is not None:
            self.total = total
        self._unsent = True
        # Cheap enough for one call per tensor: another process's events go out at most twice a
        # second (a burst's tail goes with the next one, or when the phase block ends), and always
        # for the last item.
        if (_tracker is not None or total is not None or _now() - self._last_sent >= CHILD_SEND_EVERY_S
                or self.done == self.total):
            self._flush()

    def _flush(self) -> None:
        if self._unsent:
            self._unsent = False
            self._last_sent = _now()
            _send_to_owner({"op": "progress", "done": self.done, "total": self.total})

    def tick(self) -> None:
        _send_to_owner({"op": "tick"})

    @contextlib.contextmanager
    def while_busy(self, every_s: float | None = None, min_cores: float = BUSY_MIN_CORES) -> Iterator[None]:
        """Tick every ``every_s`` while this process and its children use at least ``min_cores``.

        For work with nothing to count (NxDI's compile runs neuronx-cc in child processes for tens
        of minutes): a compile that is working keeps the phase alive, one that hangs without using
        CPU stops ticking and is reported as stalled. The threshold keeps an idle process's own
        background threads (vLLM's, this watcher) from passing for work.
        """
        interval = every_s if every_s is not None else _positive(os.environ, ENV_HEARTBEAT,
                                                                 DEFAULT_HEARTBEAT_S)
        stop = threading.Event()

        def watch() -> None:
            last = tree_cpu_seconds()
            while not stop.wait(interval):
                now = tree_cpu_seconds()
                if now - last >= min_cores * interval:
                    self.tick()
                last = now

        thread = threading.Thread(target=watch, name="kimi-neuron-busy", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def __enter__(self) -> Phase:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._flush()
        if exc is not None and not isinstance(exc, KeyboardInterrupt | SystemExit):
            fail(f"{type(exc).__name__}: {exc}")


def tree_cpu_seconds() -> float:
    """CPU seconds used by this process, its finished children and its live descendants."""
    import psutil

    me = psutil.Process()
    t = me.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in me.children(recursive=True):
        try:
            c = child.cpu_times()
        except psutil.Error:  # it ended between listing and reading
            continue
        total += c.user + c.system
    return total


def phase(name: str, *, total: int | None = None, done: int = 0, unit: str = "") -> Phase:
    """Report that the start entered ``name`` (one of PHASES), with a count when one is known."""
    if name not in PHASES:
        raise ValueError(f"unknown startup phase {name!r}; use one of {list(PHASES)}")
    return Phase(name, total, done, unit)


def fail(cause: str) -> None:
    """Report the cause of a failed start (the first cause reported is the one kept)."""
    _send_to_owner({"op": "fail", "cause": cause})


def stopping(detail: str) -> None:
    """The server begins to shut down (owner only: STOPPING=1 and the status file)."""
    if _tracker is not None:
        _tracker.mark_stopping(detail)


# ---------------------------------------------------------------------------------------------
# Installation, from the plugin's register()


def is_vllm_serve(argv: list[str]) -> bool:
    """True for the process that runs the OpenAI API server: `vllm serve ...` or
    `python -m vllm.entrypoints.openai.api_server ...`."""
    if len(argv) >= 2 and Path(argv[0]).name == "vllm" and argv[1] == "serve":
        return True
    return bool(argv) and argv[0].replace("\\", "/").endswith("vllm/entrypoints/openai/api_server.py")


def process_role(env: Mapping[str, str] = os.environ, argv: list[str] | None = None) -> str:
    """'owner' (the API server), 'child' (a process vLLM started under it), or 'off'."""
    if env.get(ENV_ENABLE) == "0":
        return "off"
    owner = env.get(ENV_OWNER)
    if owner:
        return "owner" if owner == str(os.getpid()) else "child"
    return "owner" if is_vllm_serve(sys.argv if argv is None else argv) else "off"


def start_owner(settings: Settings | None = None) -> Tracker:
    """Make this process the owner: status file, sd_notify, hub, monitor, exit reporting."""
    global _tracker, _owner
    if _tracker is not None:
        return _tracker
    import psutil  # a vLLM dependency, and the owner is a vLLM API server

    tracker = Tracker(settings or Settings.from_env(), Notifier(), psutil.Process().create_time())
    owner = _Owner(tracker)
    _tracker, _owner = tracker, owner
    os.environ[ENV_HUB] = owner.hub_name
    os.environ[ENV_OWNER] = str(os.getpid())
    tracker.begin("resolving")
    owner.start()
    _chain_excepthook()
    atexit.register(_at_exit)
    return tracker


_interrupted = False


def _chain_excepthook() -> None:
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        global _interrupted
        if issubclass(exc_type, KeyboardInterrupt):
            _interrupted = True  # SIGINT, or SIGTERM during vLLM's startup ("terminated")
        elif _tracker is not None:
            if _owner is not None:
                _owner.drain()
            _tracker.fail(f"{exc_type.__name__}: {exc}")
        previous(exc_type, exc, tb)

    sys.excepthook = hook


def _at_exit() -> None:
    if _tracker is None:
        return
    if _owner is not None:
        _owner.drain()
        _owner.stop.set()
    if _tracker.state in ("starting", "stalled") and not _interrupted:
        _tracker.fail("the server exited before it was ready (see its log)")
    else:
        _tracker.mark_stopped("stopped before it was ready" if _tracker.state in ("starting", "stalled")
                              else "the server exited")


def install() -> str:
    """Called by ``register()`` in every vLLM process; returns what it did, for the log line."""
    role = process_role()
    if role == "off":
        return "startup tracking off"
    from .patches import install as install_patches

    install_patches(PATCHES)
    if role == "child":
        return "startup events go to the API server"
    tracker = start_owner()
    systemd = "sd_notify on" if tracker.notifier.enabled else "no NOTIFY_SOCKET"
    return f"startup status in {tracker.settings.status_file}, {systemd}"


# ---------------------------------------------------------------------------------------------
# Reading the status file (``kimi-neuron status``)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_status(path: Path) -> dict[str, Any]:
    """The status file, with a non-terminal state whose process is gone turned into 'failed'."""
    status = json.loads(path.read_text())
    if status.get("state") not in TERMINAL and not _alive(int(status.get("pid", 0))):
        status["state"] = "failed"
        status["error"] = status.get("error") or (
            f"the server (pid {status.get('pid')}) is gone without reporting why; see its log")
        status["message"] = f"failed: {status['error']}"
    return status


def summary(status: dict[str, Any]) -> str:
    lines = [status.get("message") or status.get("state", "?")]
    if status.get("state") in ("starting", "stalled"):
        lines.append(f"  up {_format_s(status.get('elapsed_s') or 0)}, last progress "
                     f"{_format_s(status.get('since_progress_s') or 0)} ago "
                     f"(stall limit {_format_s(status.get('stall_timeout_s') or 0)})")
    for h in status.get("history") or []:
        count = f", {h['done']}/{h['total']} {h.get('unit') or ''}".rstrip() if h.get("total") else ""
        lines.append(f"  {h.get('label') or h['phase']}: {_format_s(h['seconds'])}{count}")
    if status.get("error"):
        lines.append(f"  error: {status['error']}")
    return "\n".join(lines)


def exit_code(status: dict[str, Any]) -> int:
    return EXIT_CODES.get(status.get("state", ""), 1)


# ---------------------------------------------------------------------------------------------
# Hooks into vLLM (in the one patch registry), so the CPU stack reports its phases too


def count_checkpoint_tensors(model: str) -> int | None:
    """Tensors in a local safetensors checkpoint (from its index, or the one file's header)."""
    root = Path(model)
    if not root.is_dir():
        return None
    index = root / "model.safetensors.index.json"
    if index.is_file():
        return len(json.loads(index.read_text()).get("weight_map", {}))
    single = root / "model.safetensors"
    if single.is_file():
        with single.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        return len([k for k in header if k != "__metadata__"])
    return None


def _has(module: ModuleType, cls: str, method: str) -> str | None:
    owner = getattr(module, cls, None)
    if owner is None:
        return f"it has no {cls}"
    if not callable(getattr(owner, method, None)):
        return f"{cls} has no method {method}"
    return None


def _wrap_load_model(module: ModuleType) -> None:
    original = module.BaseModelLoader.load_model

    @functools.wraps(original)
    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        with phase("loading"):
            model = original(self, *args, **kwargs)
        # Next: vLLM profiles memory, allocates the KV cache and warms the model up.
        phase("warming-up")
        return model

    module.BaseModelLoader.load_model = load_model


def _wrap_get_all_weights(module: ModuleType) -> None:
    original = module.DefaultModelLoader.get_all_weights

    @functools.wraps(original)
    def get_all_weights(self: Any, model_config: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        total = count_checkpoint_tensors(str(model_config.model))
        p = phase("loading", total=total, unit="tensors")
        for item in original(self, model_config, *args, **kwargs):
            p.advance()
            yield item

    module.DefaultModelLoader.get_all_weights = get_all_weights


def _wrap_initialize_kv_caches(module: ModuleType) -> None:
    original = module.EngineCore._initialize_kv_caches

    @functools.wraps(original)
    def _initialize_kv_caches(self: Any, *args: Any, **kwargs: Any) -> Any:
        with phase("warming-up"):
            return original(self, *args, **kwargs)

    module.EngineCore._initialize_kv_caches = _initialize_kv_caches


def _wrap_shutdown(module: ModuleType) -> None:
    original = module.AsyncLLM.shutdown

    @functools.wraps(original)
    def shutdown(self: Any, *args: Any, **kwargs: Any) -> Any:
        timeout = kwargs.get("timeout", args[0] if args else None)
        stopping(f"draining in-flight requests for up to {timeout} s" if timeout
                 else "shutting down (in-flight requests are aborted)")
        return original(self, *args, **kwargs)

    module.AsyncLLM.shutdown = shutdown


# Checked against vLLM 0.32.0 (the CPU stack, run here) and the vLLM 0.16.0 wheel (read, not run).
VLLM_VERSIONS = ">=0.16,<0.33"


def _patch(name: str, module: str, cls: str, method: str, why: str,
           apply: Callable[[ModuleType], None]) -> Patch:
    return Patch(name=name, distribution="vllm", versions=VLLM_VERSIONS, module=module, why=why,
                 check=lambda m: _has(m, cls, method), apply=apply, optional=True)


PATCHES = [
    _patch("startup-loading-weights", "vllm.model_executor.model_loader.base_loader", "BaseModelLoader",
           "load_model", "report the 'loading weights' phase", _wrap_load_model),
    _patch("startup-weight-count", "vllm.model_executor.model_loader.default_loader", "DefaultModelLoader",
           "get_all_weights", "count loaded tensors for progress and ETA", _wrap_get_all_weights),
    _patch("startup-warm-up", "vllm.v1.engine.core", "EngineCore", "_initialize_kv_caches",
           "report the 'warm-up' phase (memory profile, KV cache, warm-up)", _wrap_initialize_kv_caches),
    _patch("startup-stopping", "vllm.v1.engine.async_llm", "AsyncLLM", "shutdown",
           "report STOPPING=1 when the API server begins to shut down", _wrap_shutdown),
]
