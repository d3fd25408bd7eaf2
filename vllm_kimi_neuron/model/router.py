"""The ``noaux_tc`` router of DeepSeek-V3 and Kimi-K2.

``scores = sigmoid(x @ W_gate.T)`` in fp32. The checkpoint's ``e_score_correction_bias`` is added
to the scores only to *choose* experts (it was trained to balance load, not to weight outputs); the
chosen experts are weighted by their *unbiased* scores, normalised to sum to 1 (``norm_topk_prob``)
and multiplied by ``routed_scaling_factor``. With ``n_group > 1`` (DeepSeek-V3) the choice is first
limited to the ``topk_group`` groups whose two best biased scores sum highest; Kimi-K2 has one group.
Loading the bias as a pre-sigmoid linear bias, as an existing port did, changes both the choice
and the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import KimiConfig


@dataclass(frozen=True)
class Routing:
    top_k: int
    n_group: int
    topk_group: int
    normalize: bool
    scaling: float

    @classmethod
    def from_config(cls, cfg: KimiConfig) -> Routing:
        return cls(cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group, cfg.norm_topk_prob,
                   cfg.routed_scaling_factor)


def choice_scores(
    x: torch.Tensor, gate: torch.Tensor, bias: torch.Tensor, routing: Routing
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [N, hidden]`` -> (sigmoid scores, biased scores that decide the choice), both ``[N, E]``
    in fp32; experts outside the ``topk_group`` best groups have choice score -inf."""
    return choice_from_logits(F.linear(x.float(), gate.float()), bias, routing)


def choice_from_logits(
    logits: torch.Tensor, bias: torch.Tensor, routing: Routing
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`choice_scores` from router logits ``[N, E]`` already computed (e.g. by NxD's router
    linear, which knows about sequence parallelism)."""
    scores = logits.float().sigmoid()
    choice = scores + bias.float()
    if routing.topk_group < routing.n_group:
        groups = choice.unflatten(-1, (routing.n_group, -1))
        group_score = groups.topk(min(2, groups.shape[-1]), dim=-1).values.sum(-1)
        best_groups = group_score.topk(routing.topk_group, dim=-1).indices
        keep = torch.zeros_like(group_score).scatter(-1, best_groups, 1.0)
        choice = groups.masked_fill(keep.unsqueeze(-1) == 0, float("-inf")).flatten(-2)
    return scores, choice


def select(scores: torch.Tensor, choice: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights ``[N, top_k]`` from the unbiased scores, expert ids ``[N, top_k]`` by the choice)."""
    ids = choice.topk(routing.top_k, dim=-1).indices
    weights = scores.gather(-1, ids)
    if routing.normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights * routing.scaling, ids


def route(
    x: torch.Tensor, gate: torch.Tensor, bias: torch.Tensor, routing: Routing
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [N, hidden]`` -> (fp32 weights ``[N, top_k]``, expert ids ``[N, top_k]``)."""
    return select(*choice_scores(x, gate, bias, routing), routing)


def choice_margin(choice: torch.Tensor, top_k: int) -> torch.Tensor:
    """``[N]``: how far the last chosen expert's choice score leads the best unchosen one.

    A small margin means a slightly different input (bf16 rounding in a server) may swap an
    expert, which changes that token's output by a whole expert's share; inf when every
    expert (of the allowed groups) is chosen.
    """
    if top_k >= choice.shape[-1]:
        return torch.full(choice.shape[:-1], float("inf"))
    top = choice.topk(top_k + 1, dim=-1).values
    return (top[..., -2] - top[..., -1]).nan_to_num(nan=float("inf"), posinf=float("inf"))
