"""The building blocks of vllm_kimi_neuron.model against transformers' DeepSeek-V3 pieces and
against first principles (hand-made cases where the right answer is known)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DeepseekV3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention,
    DeepseekV3TopkRouter,
    apply_rotary_pos_emb_interleave,
)

from vllm_kimi_neuron.config import KimiConfig, RopeScaling
from vllm_kimi_neuron.model import rope
from vllm_kimi_neuron.model.mla import MlaDims, MlaWeights, attend_absorbed, attend_decompressed, mla, visible
from vllm_kimi_neuron.model.router import Routing, route

YARN_CASES = {
    "kimi-0905": RopeScaling(factor=64, original_max_position_embeddings=4096, beta_fast=1, beta_slow=1),
    "deepseek-v3": RopeScaling(factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1),
    "unequal-mscale": RopeScaling(factor=16, original_max_position_embeddings=2048, beta_fast=32,
                                  beta_slow=1, mscale=1.0, mscale_all_dim=0.707),
}


def _hf_config(cfg: KimiConfig) -> DeepseekV3Config:
    raw = cfg.to_dict()
    raw.pop("model_type")
    raw.pop("quantization_config", None)
    return DeepseekV3Config(**raw)


@pytest.mark.parametrize("case", sorted(YARN_CASES))
def test_yarn_frequencies_and_scales_match_transformers(case: str) -> None:
    cfg = KimiConfig(rope_scaling=YARN_CASES[case])
    hf = _hf_config(cfg)
    hf_inv_freq, hf_cos_sin_scale = ROPE_INIT_FUNCTIONS["yarn"](hf)
    assert torch.allclose(rope.inverse_frequencies(cfg), hf_inv_freq, rtol=1e-6, atol=0)
    assert rope.cos_sin_scale(cfg) == pytest.approx(hf_cos_sin_scale, rel=1e-12)
    assert rope.softmax_scale(cfg) == pytest.approx(DeepseekV3Attention(hf, 0).scaling, rel=1e-12)


def test_kimi_0905_yarn_facts() -> None:
    cfg = KimiConfig()  # the real model's values
    inv = rope.inverse_frequencies(cfg)
    plain = 1.0 / 50000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    # beta_fast = beta_slow = 1 over 4096 positions: pairs 0..19 keep their frequency, 20..31 are / 64.
    assert torch.equal(inv[:20], plain[:20])
    assert torch.allclose(inv[20:], plain[20:] / 64, rtol=1e-6)
    assert rope.softmax_scale(cfg) == pytest.approx(192**-0.5 * (0.1 * math.log(64) + 1) ** 2)
    assert rope.softmax_scale(cfg) == pytest.approx(0.1446796, abs=1e-7)
    assert rope.cos_sin_scale(cfg) == 1.0


def test_rope_rotates_interleaved_pairs_per_sequence_position() -> None:
    cfg = KimiConfig()
    inv = rope.inverse_frequencies(cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 64, generator=g)  # [B, T, heads, rope]
    positions = torch.tensor([[0, 1], [4095, 4096], [262142, 262143]])  # each sequence its own
    cos, sin = rope.cos_sin(positions, inv)
    ours = rope.apply_rope(x, cos, sin)
    # transformers: cos/sin are cat(freqs, freqs); it returns the pairs de-interleaved.
    hf_freqs = positions.unsqueeze(-1).float() * inv
    hf_cos, hf_sin = torch.cat((hf_freqs, hf_freqs), -1).cos(), torch.cat((hf_freqs, hf_freqs), -1).sin()
    hf, _ = apply_rotary_pos_emb_interleave(x, x, hf_cos, hf_sin, unsqueeze_dim=2)
    assert torch.allclose(ours[..., 0::2], hf[..., :32], atol=1e-5)
    assert torch.allclose(ours[..., 1::2], hf[..., 32:], atol=1e-5)
    for b in range(3):  # a batch row rotates exactly as that sequence alone
        alone = rope.apply_rope(x[b : b + 1], *rope.cos_sin(positions[b : b + 1], inv))
        assert torch.equal(ours[b : b + 1], alone)
    # rotation preserves each pair's length, and position 0 is the identity
    assert torch.allclose(ours.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
    assert torch.allclose(ours[0, 0], x[0, 0])


def test_router_chooses_by_biased_scores_and_weights_by_unbiased() -> None:
    # Four experts; expert 3 has the lowest raw score but a bias that makes it the best choice.
    gate = torch.eye(4)
    x = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 0.9])
    scores = torch.sigmoid(x[0])
    routing = Routing(top_k=2, n_group=1, topk_group=1, normalize=True, scaling=2.827)
    weights, ids = route(x, gate, bias, routing)
    assert sorted(ids[0].tolist()) == [0, 3]  # unbiased top-2 would be [0, 1]
    expected = {e: float(scores[e] / (scores[0] + scores[3]) * 2.827) for e in (0, 3)}
    got = dict(zip(ids[0].tolist(), weights[0].tolist(), strict=True))
    assert got == pytest.approx(expected, rel=1e-6)
    # The defect seen in an existing port: bias added to the logits before the sigmoid.
    wrong = torch.sigmoid(x[0] + bias)[[0, 3]]
    assert got[3] != pytest.approx(float(wrong[1] / wrong.sum() * 2.827), rel=1e-3)
    unnormalised, _ = route(x, gate, bias, Routing(2, 1, 1, normalize=False, scaling=1.0))
    assert dict(zip(ids[0].tolist(), unnormalised[0].tolist(), strict=True)) == pytest.approx(
        {0: float(scores[0]), 3: float(scores[3])})


def test_router_group_limit_excludes_experts_outside_the_best_groups() -> None:
    # 2 groups of 3; group 1 holds the single best expert but group 0 has the best top-2 sum.
    logits = torch.tensor([[2.0, 1.9, -5.0, 3.0, -5.0, -5.0]])
    routing = Routing(top_k=2, n_group=2, topk_group=1, normalize=True, scaling=1.0)
    _, ids = route(logits, torch.eye(6), torch.zeros(6), routing)
    assert sorted(ids[0].tolist()) == [0, 1]
    _, ids = route(logits, torch.eye(6), torch.zeros(6), Routing(2, 1, 1, True, 1.0))
    assert sorted(ids[0].tolist()) == [0, 3]


@pytest.mark.parametrize(("experts", "n_group", "topk_group", "top_k"), [(16, 1, 1, 4), (32, 4, 2, 6),
                                                                          (24, 8, 3, 5)])
def test_router_matches_transformers(experts: int, n_group: int, topk_group: int, top_k: int) -> None:
    cfg = KimiConfig(hidden_size=32, n_routed_experts=experts, num_experts_per_tok=top_k, n_group=n_group,
                     topk_group=topk_group, routed_scaling_factor=2.5)
    hf = DeepseekV3TopkRouter(_hf_config(cfg))
    g = torch.Generator().manual_seed(experts)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(experts, 32, generator=g) * 0.2)
        hf.e_score_correction_bias.copy_(torch.randn(experts, generator=g) * 0.3)
    x = torch.randn(64, 32, generator=g)
    with torch.no_grad():
        _, hf_w, hf_ids = hf(x)
    w, ids = route(x, hf.weight.detach(), hf.e_score_correction_bias, Routing.from_config(cfg))
    order, hf_order = ids.sort(-1), hf_ids.sort(-1)
    assert torch.equal(order.values, hf_order.values)
    assert torch.allclose(w.gather(-1, order.indices), hf_w.gather(-1, hf_order.indices), rtol=1e-6)
    # The bias changed the choice for some tokens, so the test exercises the split.
    unbiased = torch.sigmoid(x @ hf.weight.detach().T).topk(top_k, -1).indices.sort(-1).values
    assert not torch.equal(unbiased, order.values)


def _random_mla(g: torch.Generator, dims: MlaDims, hidden: int, q_lora: int | None) -> MlaWeights:
    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * shape[-1] ** -0.5

    q = dims.heads * (dims.nope + dims.rope)
    query = ({"q_proj": w(q, hidden)} if q_lora is None else
             {"q_a_proj": w(q_lora, hidden), "q_a_layernorm": 1 + 0.1 * torch.randn(q_lora, generator=g),
              "q_b_proj": w(q, q_lora)})
    return MlaWeights(kv_a_proj_with_mqa=w(dims.cache_width, hidden),
                      kv_a_layernorm=1 + 0.1 * torch.randn(dims.kv_lora, generator=g),
                      kv_b_proj=w(dims.heads * (dims.nope + dims.v), dims.kv_lora),
                      o_proj=w(hidden, dims.heads * dims.v), **query)


@pytest.mark.parametrize("q_lora", [24, None])
def test_absorbed_and_decompressed_attention_agree(q_lora: int | None) -> None:
    dims = MlaDims(heads=4, nope=16, rope=8, v=12, kv_lora=32)
    g = torch.Generator().manual_seed(1)
    w = _random_mla(g, dims, hidden=48, q_lora=q_lora)
    inv = rope.inverse_frequencies(KimiConfig(qk_rope_head_dim=8))
    cache = torch.randn(3, 20, dims.cache_width, generator=g)  # earlier tokens, already cached
    positions = torch.tensor([[5, 6], [17, 18], [0, 1]])  # three sequences at different points
    x = torch.randn(3, 2, 48, generator=g)
    cos, sin = rope.cos_sin(positions, inv)
    out_d, cache_d = mla(x, w, dims, cache, positions, cos, sin, 0.2, absorb=False)
    out_a, cache_a = mla(x, w, dims, cache, positions, cos, sin, 0.2, absorb=True)
    assert torch.equal(cache_d, cache_a)
    assert torch.allclose(out_a, out_d, rtol=1e-5, atol=1e-5)
    # new latents land at their own positions and nowhere else
    changed = (cache_d != cache).any(-1)
    assert changed.nonzero().tolist() == [[b, p] for b, row in enumerate(positions.tolist()) for p in row]
    # slots after a query's position are invisible: garbage there changes nothing
    spoiled = cache_d.clone()
    spoiled[0, 7:], spoiled[2, 2:] = 1e4, -1e4
    mask = visible(positions, 20)
    q_nope, q_pe = torch.randn(3, 2, 4, 16, generator=g), torch.randn(3, 2, 4, 8, generator=g)
    for attend in (attend_decompressed, attend_absorbed):
        assert torch.allclose(attend(q_nope, q_pe, spoiled, mask, w, dims, 0.2),
                              attend(q_nope, q_pe, cache_d, mask, w, dims, 0.2), atol=1e-6)
