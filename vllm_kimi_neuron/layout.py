"""The ``neuron-fp8`` checkpoint layout: tensor names, dtypes, and how NxD splits each across ranks
(which the planner's HBM budget counts; NxDI's compile does the splitting).

This is what the NxDI Kimi-K2 model loads without any conversion at load time. Names follow the
NxD modules the model is built from (``model.`` prefix dropped, experts under
``expert_mlps.mlp_op``), so a state dict read from disk can be handed to NxDI as it is.

| tensors | dtype | split over tensor-parallel ranks |
|---|---|---|
| ``embed_tokens.weight`` [V, H] | bf16 | dim 1 (hidden) |
| ``lm_head.weight`` [V, H] | bf16 | dim 0 (vocab) |
| ``q_b_proj`` / ``q_proj`` [heads*192, *], ``kv_b_proj`` [heads*256, 512] | bf16 | dim 0 (heads) |
| ``o_proj`` [H, heads*128] | bf16 | dim 1 (heads) |
| dense / shared-expert ``gate_proj``, ``up_proj`` [I, H] | bf16 | dim 0 |
| dense / shared-expert ``down_proj`` [H, I] | bf16 | dim 1 |
| routed ``gate_up_proj.weight`` [E, H, 2I], ``scale`` [E, 1, 2I] | fp8 / fp32 | see (1) |
| routed ``down_proj.weight`` [E, I, H] | fp8 | experts over EP; dim 1 over MoE-TP |
| routed ``down_proj.scale`` [E, 1, H] | fp32 | experts over EP; replicated over MoE-TP |
| ``q_a_proj``, ``kv_a_proj_with_mqa``, router, ``selection_bias``, norms | bf16 / fp32 | replicated |

(1) experts along dim 0 over EP groups; dim 2 over MoE-TP ranks (NxD splits the gate and up
halves separately, so every rank gets matching gate and up columns). ``q_a_proj`` and
``kv_a_proj_with_mqa`` are small and feed every head, so each rank keeps them whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .config import KimiConfig

# Neuron "logical cores" on a trn2.48xlarge: 128 physical NeuronCores, grouped by LNC.
PHYSICAL_CORES = 128
EXPERTS = "mlp.expert_mlps.mlp_op."


class LayoutError(ValueError):
    """A parallel layout that cannot work for this model or machine."""


@dataclass(frozen=True)
class Split:
    """How one tensor is cut: along ``dim`` over (MoE-)TP ranks, and along dim 0 over
    expert-parallel groups when ``expert_parallel``."""

    dim: int | None
    expert_parallel: bool = False


REPLICATED = Split(None)
_RULES: list[tuple[re.Pattern[str], Split]] = [
    (re.compile(r"embed_tokens\.weight$"), Split(1)),
    (re.compile(r"lm_head\.weight$"), Split(0)),
    (re.compile(r"self_attn\.(q_b_proj|q_proj|kv_b_proj)\.weight$"), Split(0)),
    (re.compile(r"self_attn\.o_proj\.weight$"), Split(1)),
    (re.compile(r"mlp\.(shared_experts\.)?(gate|up)_proj\.weight$"), Split(0)),
    (re.compile(r"mlp\.(shared_experts\.)?down_proj\.weight$"), Split(1)),
    (re.compile(re.escape(EXPERTS) + r"gate_up_proj\.(weight|scale)$"), Split(2, True)),
    (re.compile(re.escape(EXPERTS) + r"down_proj\.weight$"), Split(1, True)),
    (re.compile(re.escape(EXPERTS) + r"down_proj\.scale$"), Split(None, True)),
]


def split_rule(name: str) -> Split:
    for pattern, rule in _RULES:
        if pattern.search(name):
            return rule
    return REPLICATED


def served_dtype(name: str, stored: str) -> str:
    """The dtype tensor ``name`` has in HBM: as stored, except the router, which the Neuron model
    keeps in fp32 (its weight is stored bf16, as in the checkpoint)."""
    return "fp32" if ".mlp.router." in name else stored


def neuron_names(cfg: KimiConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor of the neuron-fp8 layout: ``name -> (dtype, full shape)``."""
    h, e = cfg.hidden_size, cfg.n_routed_experts
    heads = cfg.num_attention_heads
    out: dict[str, tuple[str, tuple[int, ...]]] = {
        "embed_tokens.weight": ("bf16", (cfg.vocab_size, h)),
        "norm.weight": ("bf16", (h,)),
        "lm_head.weight": ("bf16", (cfg.vocab_size, h)),
    }
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        a = p + "self_attn."
        out[p + "input_layernorm.weight"] = ("bf16", (h,))
        out[p + "post_attention_layernorm.weight"] = ("bf16", (h,))
        if cfg.q_lora_rank is None:
            out[a + "q_proj.weight"] = ("bf16", (heads * cfg.qk_head_dim, h))
        else:
            out[a + "q_a_proj.weight"] = ("bf16", (cfg.q_lora_rank, h))
            out[a + "q_a_layernorm.weight"] = ("bf16", (cfg.q_lora_rank,))
            out[a + "q_b_proj.weight"] = ("bf16", (heads * cfg.qk_head_dim, cfg.q_lora_rank))
        out[a + "kv_a_proj_with_mqa.weight"] = ("bf16", (cfg.kv_cache_width, h))
        out[a + "kv_a_layernorm.weight"] = ("bf16", (cfg.kv_lora_rank,))
        out[a + "kv_b_proj.weight"] = (
            "bf16", (heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank))
        out[a + "o_proj.weight"] = ("bf16", (h, heads * cfg.v_head_dim))
        if cfg.is_moe_layer(i):
            inter = cfg.moe_intermediate_size
            shared = inter * cfg.n_shared_experts
            out[p + "mlp.router.linear_router.weight"] = ("bf16", (e, h))
            out[p + "mlp.router.selection_bias"] = ("fp32", (e,))
            out[p + EXPERTS + "gate_up_proj.weight"] = ("fp8", (e, h, 2 * inter))
            out[p + EXPERTS + "gate_up_proj.scale"] = ("fp32", (e, 1, 2 * inter))
            out[p + EXPERTS + "down_proj.weight"] = ("fp8", (e, inter, h))
            out[p + EXPERTS + "down_proj.scale"] = ("fp32", (e, 1, h))
            mlp, width = p + "mlp.shared_experts.", shared
        else:
            mlp, width = p + "mlp.", cfg.intermediate_size
        out[mlp + "gate_proj.weight"] = ("bf16", (width, h))
        out[mlp + "up_proj.weight"] = ("bf16", (width, h))
        out[mlp + "down_proj.weight"] = ("bf16", (h, width))
    return out


@dataclass(frozen=True)
class ParallelLayout:
    """``tp`` ranks in all; routed experts split over ``moe_ep`` groups of ``tp // moe_ep`` ranks."""

    tp: int
    moe_ep: int = 1
    lnc: int = 2

    def __post_init__(self) -> None:
        if self.lnc not in (1, 2):
            raise LayoutError(f"lnc={self.lnc}: a trn2 logical NeuronCore groups 1 or 2 physical cores")
        if not 1 <= self.tp <= PHYSICAL_CORES // self.lnc:
            raise LayoutError(
                f"tp={self.tp} with lnc={self.lnc}: a trn2.48xlarge has {PHYSICAL_CORES // self.lnc} "
                f"logical cores at LNC {self.lnc}; use --tp between 1 and {PHYSICAL_CORES // self.lnc}"
            )
        if self.moe_ep < 1 or self.tp % self.moe_ep:
            raise LayoutError(f"moe_ep={self.moe_ep} must divide tp={self.tp}")

    @property
    def moe_tp(self) -> int:
        return self.tp // self.moe_ep

    def shard_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        rule = split_rule(name)
        out = list(shape)
        if rule.expert_parallel:
            out[0] //= self.moe_ep
        if rule.dim is not None:
            out[rule.dim] //= self.moe_tp if rule.expert_parallel else self.tp
        return tuple(out)
