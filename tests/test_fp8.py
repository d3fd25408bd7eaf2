import pytest
import torch

from vllm_kimi_neuron.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    NEURON_FP8_MAX,
    dequantize_blockwise,
    quantize_blockwise,
    quantize_per_channel,
)


def _dequant_by_loops(q: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """Independent reference: walk the blocks one by one."""
    out = torch.empty(q.shape)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows = slice(i * block, (i + 1) * block)
            cols = slice(j * block, (j + 1) * block)
            out[rows, cols] = q[rows, cols].float() * scale[i, j]
    return out


@pytest.mark.parametrize("shape", [(256, 128), (576, 256), (300, 200), (5, 7)])
def test_round_trip_matches_block_reference(shape: tuple[int, int]) -> None:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.05
    w[:3, :3] *= 100  # one block with a much larger range than the others
    q, scale = quantize_blockwise(w)
    assert q.dtype == FP8_DTYPE and scale.dtype == torch.float32
    assert scale.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    deq = dequantize_blockwise(q, scale, dtype=torch.float32)
    assert torch.equal(deq, _dequant_by_loops(q, scale, 128))
    # e4m3 has 3 mantissa bits: relative rounding error <= 2**-4 of each block's own scale.
    bound = scale.repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]
    assert torch.all((deq - w).abs() <= bound * FP8_MAX * 2**-4 + 1e-12)


def test_block_amax_maps_to_fp8_max() -> None:
    w = torch.zeros(128, 128)
    w[7, 9] = -3.0
    q, scale = quantize_blockwise(w)
    assert q.float().abs().max().item() == FP8_MAX
    assert scale.item() == pytest.approx(3.0 / FP8_MAX)


def test_zero_block_does_not_divide_by_zero() -> None:
    q, scale = quantize_blockwise(torch.zeros(128, 256))
    assert torch.all(scale == 1.0) and torch.all(q.float() == 0)


def test_wrong_scale_shape_is_explained() -> None:
    q, _ = quantize_blockwise(torch.randn(256, 256))
    with pytest.raises(ValueError, match=r"needs \(2, 2\)"):
        dequantize_blockwise(q, torch.ones(1, 2))
    with pytest.raises(ValueError, match="float8"):
        dequantize_blockwise(torch.ones(4, 4), torch.ones(1, 1))


def _per_row_by_whole_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent reference: the per-row Neuron quantisation as whole-tensor passes."""
    amax = w.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / NEURON_FP8_MAX, torch.ones_like(amax))
    return (w / scale).clamp(-NEURON_FP8_MAX, NEURON_FP8_MAX).to(FP8_DTYPE), scale


@pytest.mark.parametrize("band", [1, 37 * 384, 1 << 18])  # a row a band, bands across blocks, one band
@pytest.mark.parametrize("shape", [(256, 384), (300, 200), (5, 7)])
def test_per_channel_from_block_fp8_is_bitwise_the_whole_tensor_result(shape: tuple[int, int],
                                                                        band: int) -> None:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 0.05
    w[:3, :3] *= 100
    w[4] = 0  # an all-zero row keeps scale 1
    q, block_scale = quantize_blockwise(w)
    got_q, got_s = quantize_per_channel(q, block_scale, band_elements=band)
    want_q, want_s = _per_row_by_whole_tensor(_dequant_by_loops(q, block_scale, 128))
    assert got_q.dtype == FP8_DTYPE and got_s.shape == (shape[0], 1) and got_s[4, 0] == 1
    assert torch.equal(got_q.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(got_s, want_s)
    assert got_q.float().abs().amax() == NEURON_FP8_MAX  # never the exponent-15 range above 240
    bf16 = w.to(torch.bfloat16)
    got_q, got_s = quantize_per_channel(bf16, band_elements=band)  # a weight that is not block FP8
    want_q, want_s = _per_row_by_whole_tensor(bf16.float())
    assert torch.equal(got_q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(got_s, want_s)


def test_per_channel_refuses_what_it_cannot_quantise() -> None:
    q, scale = quantize_blockwise(torch.randn(256, 256))
    with pytest.raises(ValueError, match="2-D weight"):
        quantize_per_channel(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="needs"):
        quantize_per_channel(q, scale[:1])
    with pytest.raises(ValueError, match=r"expected a torch\.float8_e4m3fn weight"):
        quantize_per_channel(q.float(), scale)
    with pytest.raises(ValueError, match=r"NaN in rows 0\.\.1"):
        quantize_per_channel(torch.tensor([[1.0, 2.0], [3.0, float("nan")]]))
    q.view(torch.uint8)[200, 7] = 0x7F  # e4m3fn's NaN
    for fn in (quantize_per_channel, dequantize_blockwise):
        with pytest.raises(ValueError, match=r"NaN \(e4m3 byte 0x7f or 0xff\) in rows 0\.\.255"):
            fn(q, scale)


def test_transposed_result_is_the_transpose_across_its_512_row_steps() -> None:
    w = torch.randn(1100, 130, generator=torch.Generator().manual_seed(3))  # three steps, the last partial
    q, block_scale = quantize_blockwise(w)
    rows_q, rows_s = quantize_per_channel(q, block_scale)
    got_q, got_s = quantize_per_channel(q, block_scale, transpose=True)
    assert got_q.shape == (130, 1100) and got_s.shape == (1, 1100)
    assert torch.equal(got_q.view(torch.uint8), rows_q.view(torch.uint8).T) and torch.equal(got_s, rows_s.T)
