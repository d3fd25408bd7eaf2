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
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import bench_checkpoint, drop_cache, run_measured

ANCHORS = [
    ("earlier Kimi port: re-quantise at every load", "71-93 min per start"),
    ("earlier DeepSeek-V3 port: sharding", "3.5 h, ~2 TB RAM"),
]
REAL_CHECKPOINT_BYTES = 1.03e12
# One real Kimi-K2 MoE layer: 384 experts x 3 x 7168 x 2048 FP8 bytes, plus BF16 attention/shared.
REAL_LAYER_OUTPUT_BYTES = 384 * 3 * 7168 * 2048 + 2 * 190e6


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
    return run_measured(
        "from vllm_kimi_neuron.convert import convert\n"
        f"convert({str(src)!r}, {str(out)!r}, 'neuron-fp8', workers={workers}, show_progress=False)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "kimi-bench-convert")
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--max-workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    src = bench_checkpoint(args.dir, args.gb)
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
