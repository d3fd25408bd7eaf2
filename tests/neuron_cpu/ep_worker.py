"""NxD's routed experts alone (``ExpertMLPsV2``, no shared expert), at ep 1 or ep 2, on one set of
weights: the proof that the CPU-mode shims of ``nxdi_cpu.install_cpu_shims`` change no numbers.

    torchrun --nproc-per-node N ep_worker.py MODEL OUT SHIMS

Built by NxDI's ``initialize_moe_module`` from our config (as the model builds it), sharded per
rank by NxD's ``get_sharded_checkpoint``, run in NxD's CPU mode on a prefill (dropless blockwise
path) and a decode batch (all-experts path). Each rank's output is its experts' share; the sum over
ranks (what the MoE's all-reduce forms) is written by rank 0. ``SHIMS`` is 1 to install the shims
(ep 2 needs them) or 0 to run NxD unchanged (ep 1).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nxdi_cpu
import torch

PREFILL_TOKENS = 320  # tokens * top_k >= NxD's block size 512: the dropless blockwise path
DECODE_TOKENS = 4


def main(model: str, out: str, shims: str) -> None:
    nxdi_cpu.set_host_env()
    os.environ["NXD_CPU_MODE"] = "1"
    import torch.distributed as dist
    from neuronx_distributed.trace.trace import get_sharded_checkpoint
    from neuronx_distributed_inference.modules.moe_v2 import initialize_moe_module

    from vllm_kimi_neuron.neuron.hooks import install_plan_patches

    world = int(os.environ.get("WORLD_SIZE", "1"))
    layout = nxdi_cpu.Layout(f"tp1-ep{world}", 1, {"ep_degree": world} if world > 1 else {})
    nc, patches = nxdi_cpu.neuron_config(Path(model), Path(model), layout, 2, 512)
    install_plan_patches(patches)
    if shims == "1":
        nxdi_cpu.install_cpu_shims()
    app = nxdi_cpu.build_application(Path(model), nc)
    rank = nxdi_cpu.init_ranks(nc)
    config = app.config
    config.n_shared_experts = 0
    experts = initialize_moe_module(config=config).expert_mlps.eval()

    e, h, inter = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
    gen = torch.Generator().manual_seed(0)
    full = {"mlp_op.gate_up_proj.weight": torch.randn(e, h, 2 * inter, generator=gen) / h**0.5,
            "mlp_op.down_proj.weight": torch.randn(e, inter, h, generator=gen) / inter**0.5}
    shard = dict(full)
    get_sharded_checkpoint(shard, experts, rank, nc["tp_degree"])
    missing = experts.load_state_dict(shard, strict=False).missing_keys
    assert all("rank" in k for k in missing), missing

    results = {}
    with torch.inference_mode():
        for name, tokens, seq_len in (("prefill", PREFILL_TOKENS, PREFILL_TOKENS),
                                      ("decode", DECODE_TOKENS, 1)):
            hidden = torch.randn(tokens, h, generator=gen)
            scores = torch.rand(tokens, e, generator=gen)
            weights, index = scores.topk(config.num_experts_per_tok, dim=-1)
            affinities = torch.zeros_like(scores).scatter(-1, index, weights)
            part = experts(hidden, affinities, index, seq_len)
            dist.all_reduce(part)
            results[name] = part.clone()
    if rank == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
