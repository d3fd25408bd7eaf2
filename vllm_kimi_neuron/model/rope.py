"""YaRN rotary position embedding, DeepSeek variant, in the interleaved layout.

Facts (DeepSeek-V3 / Kimi-K2, matching transformers' ``DeepseekV3RotaryEmbedding`` and vLLM's
``DeepseekScalingRotaryEmbedding``):

* the rotary dims are paired as ``(x0, x1), (x2, x3), ...``; pair ``i`` turns by ``inv_freq[i]``;
* YaRN keeps the original frequency for the pairs that turn more than ``beta_fast`` times over the
  ``original_max_position_embeddings`` window, divides it by ``factor`` for those that turn fewer than
  ``beta_slow`` times, and ramps linearly in between; it is always applied (DeepSeek's own inference
  code skips it for short windows, but the checkpoints were evaluated with the HF/vLLM behaviour);
* the attention-temperature correction ``mscale(factor, mscale_all_dim)^2`` multiplies the softmax
  scale; cos/sin are multiplied only by ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)``,
  which is exactly 1 for Kimi-K2 and DeepSeek-V3 (both set ``mscale == mscale_all_dim``).

Positions are per token (``[batch, tokens]``), so every sequence of a batched decode rotates by its
own position.
"""

from __future__ import annotations

import math

import torch

from ..config import KimiConfig


def yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _correction_dim(rotations: float, dim: int, base: float, window: int) -> float:
    """The rotary dim whose pair turns ``rotations`` times over ``window`` positions."""
    return dim * math.log(window / (rotations * 2 * math.pi)) / (2 * math.log(base))


def inverse_frequencies(cfg: KimiConfig) -> torch.Tensor:
    """``[qk_rope_head_dim / 2]`` angular speeds in fp32, YaRN-corrected when the config says so."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    extrapolated = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    yarn = cfg.rope_scaling
    if yarn is None:
        return extrapolated
    interpolated = extrapolated / yarn.factor
    window = yarn.original_max_position_embeddings
    low = max(math.floor(_correction_dim(yarn.beta_fast, dim, base, window)), 0)
    high = min(math.ceil(_correction_dim(yarn.beta_slow, dim, base, window)), dim - 1)
    # A zero-width ramp would divide by zero; the reference implementations widen it the same way.
    width = high - low if high != low else 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / width).clamp(0, 1)
    return interpolated * ramp + extrapolated * (1 - ramp)


def cos_sin_scale(cfg: KimiConfig) -> float:
    yarn = cfg.rope_scaling
    if yarn is None:
        return 1.0
    return yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor, yarn.mscale_all_dim)


def softmax_scale(cfg: KimiConfig) -> float:
    """``qk_head_dim^-0.5``, times YaRN's ``mscale_all_dim`` correction squared (0.1446796 for 0905)."""
    scale = cfg.qk_head_dim**-0.5
    yarn = cfg.rope_scaling
    if yarn is not None:
        scale *= yarn_mscale(yarn.factor, yarn.mscale_all_dim) ** 2
    return scale


def cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation tables ``[*positions.shape, rope_dim / 2]`` (fp32) for integer ``positions``."""
    angles = positions.unsqueeze(-1).float() * inv_freq
    return angles.cos() * scale, angles.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x [..., tokens, (heads,) rope_dim]``; the layout is kept.

    ``cos``/``sin`` are ``[..., tokens, rope_dim / 2]``; a heads dim in ``x`` is broadcast over.
    """
    if x.dim() == cos.dim() + 1:
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1)
    return rotated.flatten(-2).to(x.dtype)
