import pytest
import torch

from vllm_kimi_neuron.fp8 import FP8_DTYPE, FP8_MAX, dequantize_blockwise, quantize_blockwise


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
