"""RMSNorm, as the checkpoint's own modeling code computes it."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dim.

    The statistics are taken in fp32 and the normalised value is cast back to ``x``'s dtype before
    the weight multiplies it, so a bf16 model rounds where the reference implementation does.
    """
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)
