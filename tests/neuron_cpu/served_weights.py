"""The weights a Neuron server holds, back in the checkpoint's names, for the pure-torch reference.

``kimi-neuron convert --format neuron-fp8`` re-quantises the routed experts per output channel and
renames tensors to NxD's modules. To compare the NxDI model with :class:`~vllm_kimi_neuron.reference.
Reference` on the *same* weights, this writes an fp32 copy of the conversion under the original
checkpoint's names (experts dequantised with their per-channel scales and transposed back), which
the reference reads like any checkpoint. Comparing against the original checkpoint instead measures
the conversion's own error, separately.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from vllm_kimi_neuron.checkpoint import CheckpointIndex, write_index, write_shard
from vllm_kimi_neuron.config import KimiConfig
from vllm_kimi_neuron.layout import EXPERTS
from vllm_kimi_neuron.reference import Batch, Reference

_RENAMES = (("mlp.router.linear_router.weight", "mlp.gate.weight"),
            ("mlp.router.selection_bias", "mlp.gate.e_score_correction_bias"))


def dequantised_copy(converted: Path, source: Path, out: Path) -> Path:
    """fp32 copy of the neuron-fp8 conversion ``converted`` (of checkpoint ``source``) in ``out``."""
    cfg = KimiConfig.from_dir(source)
    index = CheckpointIndex.open(converted)
    tensors: dict[str, torch.Tensor] = {}
    inter = cfg.moe_intermediate_size
    for name in index.weight_map:
        t = index.read(name)
        if EXPERTS in name:
            if not name.endswith(".weight"):
                continue
            layer = re.match(r"layers\.(\d+)\.", name).group(1)  # type: ignore[union-attr]
            full = t.float() * index.read(name[: -len("weight")] + "scale").float()  # [E, in, out]
            p = f"model.layers.{layer}.mlp.experts."
            for e in range(cfg.n_routed_experts):
                if "gate_up_proj" in name:
                    tensors[f"{p}{e}.gate_proj.weight"] = full[e, :, :inter].T.contiguous()
                    tensors[f"{p}{e}.up_proj.weight"] = full[e, :, inter:].T.contiguous()
                else:
                    tensors[f"{p}{e}.down_proj.weight"] = full[e].T.contiguous()
            continue
        hf = name
        for neuron, original in _RENAMES:
            hf = hf.replace(neuron, original)
        tensors[hf if hf == "lm_head.weight" else "model." + hf] = t.float()
    out.mkdir(parents=True, exist_ok=True)
    write_shard(out / "model.safetensors", tensors)
    write_index(out, dict.fromkeys(tensors, "model.safetensors"),
                sum(t.numel() * 4 for t in tensors.values()))
    raw = json.loads((source / "config.json").read_text())
    raw.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    for extra in ("generation_config.json",):
        if (source / extra).exists():
            shutil.copy(source / extra, out / extra)
    return out


def reference_logits(model_dir: Path, prompts: list[list[int]], decode: list[list[int]],
                     slots: int) -> dict[str, torch.Tensor]:
    """The same script as ``nxdi_cpu.run_script``, through the reference: each prompt prefilled
    alone, then the sequences decoded together at their own positions."""
    ref = Reference(model_dir)
    layers = ref.cfg.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    caches = [ref.new_cache(len(prompts), slots) for _ in range(layers)]
    for i, prompt in enumerate(prompts):
        own = [ref.new_cache(1, slots) for _ in range(layers)]
        h, own = ref.run(Batch.of([prompt]), own, absorb=False)
        out[f"prefill{i}"] = ref.logits(h)[0, -1]
        for layer in range(layers):
            caches[layer][i] = own[layer][0]
    lengths = [len(p) for p in prompts]
    for step, tokens in enumerate(decode):
        positions = torch.tensor([[n + step] for n in lengths])
        h, caches = ref.run(Batch.of([[t] for t in tokens]), caches, absorb=True, positions=positions)
        out[f"decode{step}"] = ref.logits(h)[:, 0]
    return out
