"""Peak memory of golden generation (the layer-streaming CPU reference) against the size of the
checkpoint's largest layer, measured in one run.

    python benchmarks/golden_memory.py [--dir DIR] [--gb 1.0] [--prompts 4] [--prompt-len 32]

Generates a Kimi-K2-format FP8 checkpoint of at least ``--gb`` GB (kept in DIR for reruns), then in
fresh processes measures (VmHWM):
1. the fixed overhead: Python + torch + this package imported, nothing run;
2. ``kimi-neuron golden`` over random token prompts (teacher-forced prefill and greedy decode).
It prints peak RSS beside the largest layer (goal: peak <= 1.5x that layer + a fixed overhead:
the interpreter, torch and the package, plus the lm_head slice the reference scores the
vocabulary with, HEAD_CHUNK_BYTES of fp32 and its bf16 source), and projects the peak for the
real 1T checkpoint from the reference's working set.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

from common import bench_checkpoint, drop_cache, run_measured

from vllm_kimi_neuron.checkpoint import CheckpointIndex
from vllm_kimi_neuron.config import KimiConfig
from vllm_kimi_neuron.reference import HEAD_CHUNK_BYTES
from vllm_kimi_neuron.weights import layer_bytes, linear_shapes

ANCHOR = "DeepSeek-V3 port's FP32 reference: ~2.7 TB of RAM"
FP32 = 4


def working_set(cfg: KimiConfig) -> int:
    """Bytes the reference holds at once beyond activations: the largest of one layer's attention
    weights in fp32 (MLA reads them together), one routed expert plus the shared expert in fp32
    (experts are read one at a time), and one lm_head slice (bf16 read + fp32 copy)."""
    layer = cfg.num_hidden_layers - 1
    shapes = {n: s for n, s in linear_shapes(cfg).items() if n.startswith(f"model.layers.{layer}.")}
    attention = sum(o * i for n, (o, i) in shapes.items() if ".self_attn." in n) * FP32
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * FP32
    head = HEAD_CHUNK_BYTES * 3 // 2
    return max(attention, expert * (1 + cfg.n_shared_experts), head)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "kimi-bench-golden")
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=2)
    args = parser.parse_args()

    # 256 experts per layer: layers of ~400 MB, so that layers, not the 0.67 GB of embedding and
    # lm_head, are what a streaming reference must not hold at once.
    src = bench_checkpoint(args.dir, args.gb, experts=256)
    cfg = KimiConfig.from_dir(src)
    files = sorted(src.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in files)
    largest = max(layer_bytes(CheckpointIndex.open(src), cfg))
    rng = random.Random(0)
    prompts = args.dir / "prompts.jsonl"
    prompts.write_text("".join(
        json.dumps({"token_ids": [rng.randrange(cfg.vocab_size) for _ in range(args.prompt_len)]}) + "\n"
        for _ in range(args.prompts)
    ))
    print(f"checkpoint: {size / 1e9:.2f} GB, {cfg.num_hidden_layers} layers, largest layer "
          f"{largest / 1e6:.0f} MB on disk; {args.prompts} prompts x {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens each\n")

    base = run_measured("import torch, vllm_kimi_neuron.golden, vllm_kimi_neuron.reference")
    drop_cache(files)
    out = args.dir / "golden.json"
    run = run_measured(
        "from vllm_kimi_neuron.golden import run\n"
        f"run({str(src)!r}, {str(prompts)!r}, {str(out)!r}, max_new_tokens={args.new_tokens})"
    )
    runtime, peak = base["rss_main_kb"] * 1e3, run["rss_main_kb"] * 1e3
    head = HEAD_CHUNK_BYTES * 3 // 2
    fixed = runtime + head
    excess = peak - fixed
    goal = 1.5 * largest + fixed
    print("| measured | MB |\n|---|---|")
    print(f"| python + torch + package, imported (measured) | {runtime / 1e6:.0f} |")
    print(f"| lm_head slice, fp32 + bf16 (HEAD_CHUNK_BYTES x 1.5) | {head / 1e6:.0f} |")
    print(f"| fixed overhead | {fixed / 1e6:.0f} |")
    print(f"| golden peak RSS | {peak / 1e6:.0f} |")
    print(f"| peak - fixed overhead | {excess / 1e6:.0f} |")
    print(f"| largest layer on disk | {largest / 1e6:.0f} |")
    print(f"| goal: 1.5x largest layer + fixed overhead | {goal / 1e6:.0f} |")
    print(f"\npeak is {excess / largest:.2f}x the largest layer above the fixed overhead "
          f"({'meets' if peak <= goal else 'MISSES'} the goal); golden took {run['wall']:.1f} s, "
          f"{args.new_tokens} passes over {size / 1e9:.2f} GB")

    real = KimiConfig()
    ws_here, ws_real = working_set(cfg), working_set(real)
    factor = (peak - runtime) / ws_here
    projected = runtime + factor * ws_real
    print(f"\nprojection for the real Kimi-K2 checkpoint ({real.num_hidden_layers} layers, "
          f"{real.n_routed_experts} experts):")
    print(f"  reference working set here {ws_here / 1e6:.0f} MB, real {ws_real / 1e6:.0f} MB; "
          f"measured peak above the runtime here is {factor:.2f}x the working set")
    print(f"  projected peak RSS: {projected / 1e9:.1f} GB (+ activations: a few MB per 1k prompt "
          f"tokens at hidden {real.hidden_size}), independent of the 1 TB checkpoint size")
    print(f"  anchor: {ANCHOR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
