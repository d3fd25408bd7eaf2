"""Multi-head Latent Attention (MLA) over a compressed cache, in both of its forms.

Per token, ``kv_a_proj_with_mqa`` gives ``[c_kv (kv_lora_rank) | k_pe (qk_rope_head_dim)]``. The cache
stores exactly that, after RMSNorm on ``c_kv`` and RoPE on ``k_pe``: 576 values per token and layer
for Kimi-K2, in the projection's order (also vLLM's cache layout). ``kv_b_proj`` maps ``c_kv`` to
per-head ``[k_nope | v]``; split it into ``W_UK [heads, nope, L]`` and ``W_UV [heads, v, L]``.

* Decompressed (prefill): expand every cached ``c_kv`` into per-head keys and values, then
  ordinary multi-head attention with keys ``[k_nope | k_pe]``.
* Absorbed (decode): fold ``W_UK`` into the query (``q_nope @ W_UK``, one ``L``-wide vector per
  head) and ``W_UV`` into the output, so attention runs directly on the cache as multi-query
  attention with 576-wide keys and 512-wide values; nothing is expanded per cached token.

Both are the same function of the inputs; they differ only in the order of the matmuls.

Cache slots are token positions: slot ``s`` of a sequence holds its token at position ``s``, and a
query at position ``p`` sees slots ``0..p``. New tokens are written at their positions before
attention, so one code path serves prefill, batched decode with every sequence at its own
position, and right-padded batches (padding writes only to slots no real query can see).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import KimiConfig
from .norm import rms_norm
from .rope import apply_rope

# The checkpoint's modeling code builds the two latent RMSNorms with their default eps, not
# config.rms_norm_eps (vLLM uses the config value; the difference is below fp32 noise at Kimi's 1e-6).
LATENT_NORM_EPS = 1e-6


@dataclass(frozen=True)
class MlaDims:
    heads: int
    nope: int
    rope: int
    v: int
    kv_lora: int

    @classmethod
    def from_config(cls, cfg: KimiConfig) -> MlaDims:
        return cls(cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                   cfg.v_head_dim, cfg.kv_lora_rank)

    @property
    def cache_width(self) -> int:
        return self.kv_lora + self.rope


@dataclass(frozen=True)
class MlaWeights:
    """One layer's attention weights, ``[out, in]`` like ``nn.Linear``.

    Exactly one query path is set: ``q_proj`` (no query compression), or ``q_a_proj`` +
    ``q_a_layernorm`` + ``q_b_proj`` (q_lora_rank set, as in Kimi-K2).
    """

    kv_a_proj_with_mqa: torch.Tensor
    kv_a_layernorm: torch.Tensor
    kv_b_proj: torch.Tensor
    o_proj: torch.Tensor
    q_proj: torch.Tensor | None = None
    q_a_proj: torch.Tensor | None = None
    q_a_layernorm: torch.Tensor | None = None
    q_b_proj: torch.Tensor | None = None


def queries(
    x: torch.Tensor, w: MlaWeights, dims: MlaDims, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [B, T, hidden]`` -> ``q_nope [B, T, heads, nope]``, roped ``q_pe [B, T, heads, rope]``."""
    if w.q_proj is not None:
        q = F.linear(x, w.q_proj)
    else:
        assert w.q_a_proj is not None and w.q_a_layernorm is not None and w.q_b_proj is not None
        q = F.linear(rms_norm(F.linear(x, w.q_a_proj), w.q_a_layernorm, LATENT_NORM_EPS), w.q_b_proj)
    q = q.unflatten(-1, (dims.heads, dims.nope + dims.rope))
    q_nope, q_pe = q.split([dims.nope, dims.rope], dim=-1)
    return q_nope, apply_rope(q_pe, cos, sin)


def latents(
    x: torch.Tensor, w: MlaWeights, dims: MlaDims, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """What the cache stores for ``x [B, T, hidden]``: ``[B, T, kv_lora + rope]``."""
    c_kv, k_pe = F.linear(x, w.kv_a_proj_with_mqa).split([dims.kv_lora, dims.rope], dim=-1)
    return torch.cat((rms_norm(c_kv, w.kv_a_layernorm, LATENT_NORM_EPS), apply_rope(k_pe, cos, sin)), -1)


def write_cache(cache: torch.Tensor, new: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``cache [B, S, W]`` with ``new [B, T, W]`` written at slots ``positions [B, T]`` (out of place)."""
    index = positions.unsqueeze(-1).expand(-1, -1, cache.shape[-1])
    return cache.scatter(1, index, new.to(cache.dtype))


def visible(positions: torch.Tensor, slots: int) -> torch.Tensor:
    """``[B, T, slots]``: may the query at ``positions[b, t]`` see cache slot ``s`` (``s <= pos``)."""
    return torch.arange(slots, device=positions.device) <= positions.unsqueeze(-1)


def _split_kv_b(w: MlaWeights, dims: MlaDims) -> tuple[torch.Tensor, torch.Tensor]:
    """``W_UK [heads, nope, L]`` and ``W_UV [heads, v, L]`` from ``kv_b_proj``."""
    kv_b = w.kv_b_proj.unflatten(0, (dims.heads, dims.nope + dims.v))
    return kv_b[:, : dims.nope], kv_b[:, dims.nope :]


def _softmax(scores: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Masked softmax over the last dim in fp32; ``mask [B, T, S]`` broadcasts over the heads dim."""
    scores = scores.float().masked_fill(~mask.unsqueeze(1), float("-inf"))
    return torch.softmax(scores, dim=-1).to(dtype)


def attend_decompressed(
    q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, mask: torch.Tensor,
    w: MlaWeights, dims: MlaDims, scale: float,
) -> torch.Tensor:
    """Prefill form: per-head keys/values expanded from every cached latent. Returns ``[B, T, heads, v]``."""
    w_uk, w_uv = _split_kv_b(w, dims)
    c_kv, k_pe = cache.to(q_nope.dtype).split([dims.kv_lora, dims.rope], dim=-1)
    k_nope = torch.einsum("bsl,hpl->bshp", c_kv, w_uk)
    v = torch.einsum("bsl,hvl->bshv", c_kv, w_uv)
    scores = torch.einsum("bthp,bshp->bhts", q_nope, k_nope) + torch.einsum("bthr,bsr->bhts", q_pe, k_pe)
    probs = _softmax(scores * scale, mask, q_nope.dtype)
    return torch.einsum("bhts,bshv->bthv", probs, v)


def attend_absorbed(
    q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, mask: torch.Tensor,
    w: MlaWeights, dims: MlaDims, scale: float,
) -> torch.Tensor:
    """Decode form: ``W_UK``/``W_UV`` folded into query and output; attention over the raw cache."""
    w_uk, w_uv = _split_kv_b(w, dims)
    c_kv, k_pe = cache.to(q_nope.dtype).split([dims.kv_lora, dims.rope], dim=-1)
    q_latent = torch.einsum("bthp,hpl->bthl", q_nope, w_uk)
    scores = torch.einsum("bthl,bsl->bhts", q_latent, c_kv) + torch.einsum("bthr,bsr->bhts", q_pe, k_pe)
    probs = _softmax(scores * scale, mask, q_nope.dtype)
    o_latent = torch.einsum("bhts,bsl->bthl", probs, c_kv)
    return torch.einsum("bthl,hvl->bthv", o_latent, w_uv)


def mla(
    x: torch.Tensor,
    w: MlaWeights,
    dims: MlaDims,
    cache: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    scale: float,
    absorb: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One attention block: ``x [B, T, hidden]`` at ``positions [B, T]`` against ``cache [B, S, W]``.

    ``cos``/``sin`` are the rotation tables for ``positions``. Returns the block's output
    ``[B, T, hidden]`` (before the residual add) and the cache with this step's tokens written.
    """
    q_nope, q_pe = queries(x, w, dims, cos, sin)
    cache = write_cache(cache, latents(x, w, dims, cos, sin), positions)
    attend = attend_absorbed if absorb else attend_decompressed
    out = attend(q_nope, q_pe, cache, visible(positions, cache.shape[1]), w, dims, scale)
    return F.linear(out.flatten(-2), w.o_proj), cache
