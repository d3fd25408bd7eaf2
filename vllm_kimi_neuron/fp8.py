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


def _row_scales(scale_inv: torch.Tensor, rows: int, block_rows: int) -> torch.Tensor:
    """One row of block scales per weight row: ``[rows, col_blocks]`` float32."""
    return scale_inv.float().repeat_interleave(block_rows, dim=0)[:rows]


def _check_fp8(weight: torch.Tensor) -> None:
    if weight.dtype != FP8_DTYPE:
        raise ValueError(f"expected a {FP8_DTYPE} weight, got {weight.dtype}")


# fp32 elements per band of rows that the conversions below work on at a time: small enough for a
# band's two buffers (8 MiB) to stay in cache, large enough that torch's per-call overhead does not
# dominate. On the 2-core development VM, 2**20 ran a Kimi expert weight 3.4x faster than
# whole-tensor passes, and 2**22 fell out of cache; the best value depends on the host's caches.
_BAND_ELEMENTS = 1 << 20


def _row_bands(rows: int, cols: int, band_elements: int) -> tuple[int, list[tuple[int, int]]]:
    band = max(1, min(rows, band_elements // max(cols, 1)))
    return band, [(start, min(rows, start + band)) for start in range(0, rows, band)]


_SIGN_EXPONENT_MANTISSA = 0x87F00000 - (1 << 32)  # bits 31 and 26..20, as an int32


def _decode_scaled_(weight: torch.Tensor, row_scale: torch.Tensor, block_cols: int,
                    bits: torch.Tensor, first_row: int) -> torch.Tensor:
    """Rows of an e4m3fn weight times their block scales, as float32, in the int32 buffer ``bits``.

    torch converts float8 to float32 one element at a time; this does it with three vector integer
    ops: each byte, sign-extended and shifted left by 20, puts its 4 exponent and 3 mantissa bits
    where float32 keeps its own and its sign in bit 31 (the mask clears the extension between),
    which reads as the value times 2**-120 (e4m3 subnormals land on float32 subnormals), so a
    multiply by 2**120 restores it exactly. NaN bytes (0x7f, 0xff) would decode as +-480, so they
    are refused first.
    """
    raw = weight.view(torch.uint8)
    if bool(raw.bitwise_and(0x7F).eq_(0x7F).any()):
        raise ValueError(f"NaN (e4m3 byte 0x7f or 0xff) in rows {first_row}..{first_row + len(raw) - 1}: "
                         "the checkpoint is corrupt")
    bits.copy_(weight.view(torch.int8)).bitwise_left_shift_(20).bitwise_and_(_SIGN_EXPONENT_MANTISSA)
    w = bits.view(torch.float32).mul_(2.0**120)
    cols = w.shape[1]
    whole = cols // block_cols  # each row's block scales spread over its 128-wide column blocks
    w[:, : whole * block_cols].unflatten(1, (whole, block_cols)).mul_(row_scale[:, :whole, None])
    if whole * block_cols < cols:  # a last, narrower block column
        w[:, whole * block_cols :].mul_(row_scale[:, whole:])
    return w


def dequantize_blockwise(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    dtype: torch.dtype = torch.bfloat16,
    band_elements: int = _BAND_ELEMENTS,
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``W_fp8 * weight_scale_inv`` per block, in fp32, cast.

    Rows are decoded and scaled a band at a time into the fp32 result, so the only full-size
    temporary is that result: dequantising a 1 TB checkpoint tensor by tensor needs 5 bytes per
    weight at the peak, not the 13 that a fully expanded scale matrix would take. A NaN in the
    weight is a ValueError.
    """
    _check_fp8(weight)
    _check_scale_shape(weight.shape, scale_inv, block)
    rows, cols = weight.shape
    row_scale = _row_scales(scale_inv, rows, block[0])
    w = torch.empty(rows, cols)
    _, bands = _row_bands(rows, cols, band_elements)
    for start, stop in bands:
        _decode_scaled_(weight[start:stop], row_scale[start:stop], block[1],
                        w[start:stop].view(torch.int32), start)
    return w.to(dtype)


# Neuron's FP8 "e4m3" is the IEEE-style variant: exponent 15 encodes inf/NaN, so its largest finite
# value is 1.875 * 2**7 = 240, where the OCP e4m3fn format of the checkpoint reaches 448. NxDI
# compiles with --experimental-unsafe-fp8e4m3fn-as-fp8e4m3, which reinterprets e4m3fn bytes as
# e4m3: any byte with exponent bits 1111 (|x| >= 256) would turn into inf/NaN on device. Values
# re-quantised for Neuron are therefore scaled so the channel's amax maps to 240 and clamped to
# +-240 before the cast (240 is exactly representable and rounding is monotone, so no value can
# round up into exponent 15).
NEURON_FP8_MAX = 240.0


def quantize_per_channel(
    weight: torch.Tensor, scale_inv: torch.Tensor | None = None, block: tuple[int, int] = (128, 128),
    transpose: bool = False, band_elements: int = _BAND_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight ``[out, in]`` -> symmetric FP8 for Neuron with one float32 scale per output row.

    ``weight`` is block FP8 with its ``scale_inv`` (dequantised as :func:`dequantize_blockwise`
    does), or any float dtype without one. Each row's amax maps to ``NEURON_FP8_MAX`` and values
    are clamped to +-240 before the cast. Returns the weight ``[out, in]`` and its scales
    ``[out, 1]``, or with ``transpose`` ``[in, out]`` and ``[1, out]``. A NaN in the weight is a
    ValueError. The work goes a band of rows at a time (every row is whole in its band, so its
    amax is too): each step's fp32 intermediates stay in cache, and the result is bit for bit that
    of whole-tensor passes.
    Rounding error per element is at most ``max(|w| * 2**-4, scale * 2**-10)``: e4m3 keeps 3
    mantissa bits (half an ulp is 2**-4 relative) down to 2**-6, below which the subnormal
    spacing is 2**-9.
    """
    if weight.dim() != 2:
        raise ValueError(f"per-channel FP8 quantisation needs a 2-D weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    row_scale = None
    if scale_inv is not None:
        _check_fp8(weight)
        _check_scale_shape(weight.shape, scale_inv, block)
        row_scale = _row_scales(scale_inv, rows, block[0])
    out = torch.empty(rows, cols, dtype=FP8_DTYPE)
    scales = torch.empty(rows, 1)
    band, bands = _row_bands(rows, cols, band_elements)
    work = torch.empty(band, cols)
    magnitude = torch.empty(band, cols)
    for start, stop in bands:
        n = stop - start
        if row_scale is None:
            w = work[:n].copy_(weight[start:stop])
        else:
            w = _decode_scaled_(weight[start:stop], row_scale[start:stop], block[1],
                                work[:n].view(torch.int32), start)
        amax = torch.abs(w, out=magnitude[:n]).amax(dim=1, keepdim=True)
        if bool(amax.isnan().any()):
            raise ValueError(f"NaN in rows {start}..{stop - 1}: the checkpoint is corrupt")
        scale = torch.where(amax > 0, amax / NEURON_FP8_MAX, torch.ones_like(amax))
        out[start:stop].copy_(w.div_(scale).clamp_(-NEURON_FP8_MAX, NEURON_FP8_MAX))
        scales[start:stop] = scale
    if not transpose:
        return out, scales
    # Moving the FP8 bytes 512 source rows at a time ran 1.7x faster here than one whole transpose,
    # and faster than casting into a transposed destination inside the loop.
    out_t = torch.empty(cols, rows, dtype=FP8_DTYPE)
    for start in range(0, rows, 512):
        out_t[:, start : start + 512].copy_(out[start : start + 512].T)
    return out_t, scales.T
