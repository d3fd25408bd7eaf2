"""FP8 e4m3 with 128x128 block scales: the Kimi-K2 / DeepSeek-V3 checkpoint weight format.

A quantised weight ``W[out, in]`` is stored as ``float8_e4m3fn`` plus ``weight_scale_inv`` of shape
``[ceil(out/128), ceil(in/128)]`` in float32; ``W ~= W_fp8 * weight_scale_inv`` block by block.
Edge blocks that do not fill 128x128 use the same scale for the part that exists.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448 for OCP e4m3fn
SCALE_SUFFIX = "weight_scale_inv"


def _expand_blocks(scale: torch.Tensor, shape: torch.Size, block: tuple[int, int]) -> torch.Tensor:
    rows, cols = shape
    return scale.repeat_interleave(block[0], dim=0)[:rows].repeat_interleave(block[1], dim=1)[:, :cols]


def _check_scale_shape(shape: torch.Size, scale: torch.Tensor, block: tuple[int, int]) -> None:
    expected = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"weight_scale_inv has shape {tuple(scale.shape)} but a weight of shape {tuple(shape)} "
            f"with {block[0]}x{block[1]} blocks needs {expected}"
        )


def quantize_blockwise(
    weight: torch.Tensor, block: tuple[int, int] = (128, 128)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a 2-D weight to e4m3 with one float32 inverse scale per block (amax maps to 448)."""
    if weight.dim() != 2:
        raise ValueError(f"block FP8 quantisation needs a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.float()
    rows, cols = w.shape
    br, bc = -(-rows // block[0]), -(-cols // block[1])
    padded = torch.zeros(br * block[0], bc * block[1])
    padded[:rows, :cols] = w.abs()
    amax = padded.view(br, block[0], bc, block[1]).amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w / _expand_blocks(scale_inv, w.shape, block)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale_inv


def dequantize_blockwise(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``W_fp8 * weight_scale_inv`` per block, in fp32, cast.

    The scales multiply the fp32 copy in place, block column by block column, so the only
    full-size temporary is that copy: dequantising a 1 TB checkpoint tensor by tensor needs
    5 bytes per weight at the peak, not the 13 that a fully expanded scale matrix would take.
    """
    if weight.dtype != FP8_DTYPE:
        raise ValueError(f"expected a {FP8_DTYPE} weight, got {weight.dtype}")
    _check_scale_shape(weight.shape, scale_inv, block)
    rows, cols = weight.shape
    w = weight.to(torch.float32)
    row_scale = scale_inv.float().repeat_interleave(block[0], dim=0)[:rows]  # [rows, col_blocks]
    whole = cols // block[1]
    w[:, : whole * block[1]].unflatten(1, (whole, block[1])).mul_(row_scale[:, :whole, None])
    if whole * block[1] < cols:  # a last, narrower block column
        w[:, whole * block[1] :].mul_(row_scale[:, whole:])
    return w.to(dtype)


# Neuron's FP8 "e4m3" is the IEEE-style variant: exponent 15 encodes inf/NaN, so its largest finite
# value is 1.875 * 2**7 = 240, where the OCP e4m3fn format of the checkpoint reaches 448. NxDI
# compiles with --experimental-unsafe-fp8e4m3fn-as-fp8e4m3, which reinterprets e4m3fn bytes as
# e4m3: any byte with exponent bits 1111 (|x| >= 256) would turn into inf/NaN on device. Values
# re-quantised for Neuron are therefore scaled so the channel's amax maps to 240 and clamped to
# +-240 before the cast (240 is exactly representable and rounding is monotone, so no value can
# round up into exponent 15).
NEURON_FP8_MAX = 240.0


def quantize_per_channel(weight: torch.Tensor, reduce_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric FP8 for Neuron with one float32 scale per output channel.

    ``reduce_dim`` is the input dimension (the one the amax runs over); the scale keeps it as size 1,
    e.g. experts ``[E, in, out]`` with ``reduce_dim=1`` give scales ``[E, 1, out]``.
    Rounding error per element is at most ``max(|w| * 2**-4, scale * 2**-10)``: e4m3 keeps 3 mantissa
    bits (half an ulp is 2**-4 relative) down to 2**-6, below which the subnormal spacing is 2**-9.
    """
    w = weight.float()
    amax = w.abs().amax(dim=reduce_dim, keepdim=True)
    scale = torch.where(amax > 0, amax / NEURON_FP8_MAX, torch.ones_like(amax))
    q = (w / scale).clamp(-NEURON_FP8_MAX, NEURON_FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_per_channel(weight: torch.Tensor, scale: torch.Tensor,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (weight.float() * scale.float()).to(dtype)
