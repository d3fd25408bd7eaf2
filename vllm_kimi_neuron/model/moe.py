"""SwiGLU experts, the shared expert and the dense MLP of the first layers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MlpWeights:
    gate_proj: torch.Tensor  # [inter, hidden]
    up_proj: torch.Tensor  # [inter, hidden]
    down_proj: torch.Tensor  # [hidden, inter]


def swiglu(x: torch.Tensor, w: MlpWeights) -> torch.Tensor:
    """``down(silu(gate(x)) * up(x))``: a routed expert, the shared expert and the dense MLP alike."""
    return F.linear(F.silu(F.linear(x, w.gate_proj)) * F.linear(x, w.up_proj), w.down_proj)


def routed_experts(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, expert: Callable[[int], MlpWeights]
) -> torch.Tensor:
    """``sum_j weights[:, j] * expert_{ids[:, j]}(x)`` for ``x [N, hidden]``.

    Host-side dispatch for the CPU reference, and the one data-dependent function here: it runs
    only the experts some token chose, each on its own tokens, so the reference does
    ``top_k / n_experts`` of a dense pass and ``expert(e)`` reads (and dequantises) only what is
    used. On Neuron, NxDI's expert kernels do this step; the router and ``swiglu`` are shared.
    """
    out = torch.zeros_like(x)
    for e in torch.unique(ids).tolist():
        token, slot = (ids == e).nonzero(as_tuple=True)
        y = swiglu(x[token], expert(e)) * weights[token, slot].unsqueeze(-1).to(x.dtype)
        out.index_add_(0, token, y)
    return out
