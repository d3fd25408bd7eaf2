"""What the benchmarks share: a Kimi-K2-shaped checkpoint of a chosen size, dropping the page
cache, and running a step in a fresh process to measure its own peak RSS."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from vllm_kimi_neuron.config import KimiConfig
from vllm_kimi_neuron.tiny import make_tiny, tiny_config


def bench_config(target_gb: float, experts: int = 64) -> KimiConfig:
    """The tiny model widened to hidden 1024 with ``experts`` experts per layer, and as many
    layers as it takes to reach ``target_gb`` GB of FP8 weights on disk."""
    base = dataclasses.replace(tiny_config(), hidden_size=1024, moe_intermediate_size=512,
                               n_routed_experts=experts, num_experts_per_tok=4, intermediate_size=2048)
    per_layer = 3 * base.n_routed_experts * base.hidden_size * base.moe_intermediate_size
    fixed = 2 * 2 * base.vocab_size * base.hidden_size
    layers = max(2, int((target_gb * 1e9 - fixed) / per_layer) + 2)
    return dataclasses.replace(base, num_hidden_layers=layers)


def bench_checkpoint(root: Path, target_gb: float, experts: int = 64) -> Path:
    """``root/fp8``, generated once and reused while its config matches."""
    src = root / "fp8"
    cfg = bench_config(target_gb, experts)
    if not (src / "config.json").exists() or KimiConfig.from_dir(src) != cfg:
        shutil.rmtree(src, ignore_errors=True)
        print(f"generating a {target_gb} GB checkpoint ({cfg.num_hidden_layers} layers) in {src} ...",
              file=sys.stderr)
        make_tiny(src, seed=0, config=cfg)
    return src


def drop_cache(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_measured(code: str) -> dict[str, float]:
    """Run ``code`` in a fresh interpreter; returns its wall time (``wall``, seconds), its own peak
    RSS (``rss_main_kb``, VmHWM: ru_maxrss would carry the parent's RSS over at fork) and the
    largest peak of its child processes (``rss_worker_kb``)."""
    script = (
        "import json, resource, time\n"
        "t = time.perf_counter()\n"
        f"{code}\n"
        "wall = time.perf_counter() - t\n"
        "me = int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])\n"
        "kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(json.dumps({'wall': wall, 'rss_main_kb': me, 'rss_worker_kb': kids}))\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"benchmark step failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])
