"""Conversion throughput against the raw read rate of the same files, measured in one run.

    python benchmarks/convert.py [--dir DIR] [--gb 2.0] [--max-workers N]

Generates a Kimi-K2-format FP8 checkpoint of at least ``--gb`` GB (kept in DIR for reruns), then:
1. raw read rate: every input file read once, page cache dropped first (posix_fadvise DONTNEED);
2. ``neuron-fp8`` conversion with 1..N workers, page cache dropped before each run, in a
   subprocess so its peak RSS (and its workers') is measured on its own;
3. peak RSS beside the largest output group, and a projection for the real 1 TB checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vllm_kimi_neuron.config import KimiConfig
from vllm_kimi_neuron.tiny import make_tiny, tiny_config

ANCHORS = [
    ("earlier Kimi port: re-quantise at every load", "71-93 min per start"),
    ("earlier DeepSeek-V3 port: sharding", "3.5 h, ~2 TB RAM"),
]
REAL_CHECKPOINT_BYTES = 1.03e12
# One real Kimi-K2 MoE layer: 384 experts x 3 x 7168 x 2048 FP8 bytes, plus BF16 attention/shared.
REAL_LAYER_OUTPUT_BYTES = 384 * 3 * 7168 * 2048 + 2 * 190e6


def bench_config(target_gb: float) -> KimiConfig:
    base = dataclasses.replace(tiny_config(), hidden_size=1024, moe_intermediate_size=512,
                               n_routed_experts=64, num_experts_per_tok=4, intermediate_size=2048)
    per_layer = 3 * base.n_routed_experts * base.hidden_size * base.moe_intermediate_size
    fixed = 2 * 2 * base.vocab_size * base.hidden_size
    layers = max(2, int((target_gb * 1e9 - fixed) / per_layer) + 2)
    return dataclasses.replace(base, num_hidden_layers=layers)


def drop_cache(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read_rate(files: list[Path]) -> float:
    drop_cache(files)
    start = time.perf_counter()
    total = 0
    for p in files:
        with p.open("rb") as f:
            while block := f.read(1 << 24):
                total += len(block)
    return total / (time.perf_counter() - start)


def timed_convert(src: Path, out: Path, workers: int) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    drop_cache(sorted(src.glob("*.safetensors")))
    code = (
        "import json, resource, sys, time\n"
        "from vllm_kimi_neuron.convert import convert\n"
        "t = time.perf_counter()\n"
        f"convert({str(src)!r}, {str(out)!r}, 'neuron-fp8', workers={workers}, show_progress=False)\n"
        "wall = time.perf_counter() - t\n"
        # VmHWM is this process's own peak: ru_maxrss would carry over the parent's RSS at fork.
        "me = int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])\n"
        "kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(json.dumps({'wall': wall, 'rss_main_kb': me, 'rss_worker_kb': kids}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "kimi-bench-convert")
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--max-workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    src = args.dir / "fp8"
    cfg = bench_config(args.gb)
    if not (src / "config.json").exists() or KimiConfig.from_dir(src) != cfg:
        shutil.rmtree(src, ignore_errors=True)
        print(f"generating a {args.gb} GB checkpoint ({cfg.num_hidden_layers} layers) in {src} ...",
              file=sys.stderr)
        make_tiny(src, seed=0, config=cfg)
    files = sorted(src.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in files)
    read_rate = raw_read_rate(files)
    print(f"input: {size / 1e9:.2f} GB in {len(files)} shards; raw read rate {read_rate / 1e6:.0f} MB/s "
          f"(page cache dropped)")
    print(f"machine: {os.cpu_count()} CPUs\n")
    print("| workers | wall s | MB/s | vs raw read | peak RSS main | peak RSS per worker |")
    print("|---|---|---|---|---|---|")
    results = []
    workers = 1
    while workers <= args.max_workers:
        r = timed_convert(src, args.dir / "out", workers)
        rate = size / r["wall"]
        results.append((workers, rate, r))
        print(f"| {workers} | {r['wall']:.1f} | {rate / 1e6:.0f} | {rate / read_rate:.2f}x | "
              f"{r['rss_main_kb'] / 1e6:.2f} GB | {r['rss_worker_kb'] / 1e6:.2f} GB |", flush=True)
        workers *= 2
    out_files = sorted((args.dir / "out").glob("neuron-*.safetensors"))
    largest = max(p.stat().st_size for p in out_files)
    one = results[0][2]
    peak = max(one["rss_main_kb"], one["rss_worker_kb"]) * 1e3
    print(f"\nlargest output group: {largest / 1e6:.0f} MB; peak RSS with 1 worker "
          f"{peak / 1e6:.0f} MB = {peak / largest:.2f}x the group "
          f"(includes the Python + torch baseline of roughly 300-400 MB)")
    best_workers, best_rate, _ = max(results, key=lambda x: x[1])
    per_worker = results[0][1]
    ram_workers = int(2048e9 // (2 * REAL_LAYER_OUTPUT_BYTES))
    proj_workers = min(96, ram_workers)
    proj = REAL_CHECKPOINT_BYTES / (per_worker * proj_workers)
    print("\nprojection for the real 1 TB checkpoint on a trn2.48xlarge host (192 vCPUs, 2 TiB RAM):")
    print(f"  one worker here converts {per_worker / 1e6:.0f} MB/s; a real MoE layer group is "
          f"{REAL_LAYER_OUTPUT_BYTES / 1e9:.1f} GB, so RAM allows ~{ram_workers} workers at 2x a group;")
    print(f"  with {proj_workers} workers at this per-worker rate: {proj / 60:.0f} min, if the disks "
          f"deliver {per_worker * proj_workers / 1e9:.1f} GB/s (else disk-bound: 1 TB / read rate)")
    print(f"  best here: {best_workers} workers, {best_rate / 1e6:.0f} MB/s "
          f"({best_rate / read_rate:.2f}x the raw read rate; goal >= 0.8x)")
    print("\nanchors: " + "; ".join(f"{a}: {b}" for a, b in ANCHORS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
