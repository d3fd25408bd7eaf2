"""A CPU reference of Kimi-K2 that streams the checkpoint instead of holding it.

It runs the functions of :mod:`vllm_kimi_neuron.model` in fp32 directly on the checkpoint's files:
every weight is read from its shard with plain reads when it is needed, FP8 weights are
dequantised with their block scales, and the tensor is dropped right after use. A decoder layer
runs every token of the batch before the next layer is touched, and of a MoE layer only the
experts that some token chose are read at all. Memory therefore holds the activations, the MLA
cache of the current layer and the largest single weight (a few GB for the 1 T-parameter model),
where a fully loaded fp32 reference needs terabytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import weights as names
from .checkpoint import CheckpointError, CheckpointIndex
from .config import KimiConfig
from .fp8 import FP8_DTYPE, dequantize_blockwise
from .model import rope
from .model.mla import MlaDims, mla
from .model.moe import routed_experts, swiglu
from .model.norm import rms_norm
from .model.router import Routing, choice_margin, choice_scores, select

# lm_head rows per matmul when scoring the vocabulary: bounds the fp32 slice in memory.
HEAD_CHUNK_BYTES = 128 << 20


@dataclass(frozen=True)
class TopLogprobs:
    """Log-probabilities over the whole vocabulary, summarised per row."""

    ids: torch.Tensor  # [N, k], best first
    logprobs: torch.Tensor  # [N, k]
    target_logprobs: torch.Tensor  # [N]: of the requested target token of each row


@dataclass(frozen=True)
class Batch:
    """Right-padded token ids with each sequence's positions 0..len-1."""

    tokens: torch.Tensor  # [B, T]
    positions: torch.Tensor  # [B, T]
    valid: torch.Tensor  # [B, T] bool
    lengths: list[int]

    @classmethod
    def of(cls, sequences: list[list[int]]) -> Batch:
        if not sequences or not all(sequences):
            raise ValueError("every sequence needs at least one token")
        lengths = [len(s) for s in sequences]
        width = max(lengths)
        tokens = torch.tensor([s + [0] * (width - len(s)) for s in sequences])
        positions = torch.arange(width).expand(len(sequences), width)
        return cls(tokens, positions, positions < torch.tensor(lengths).unsqueeze(1), lengths)


class Reference:
    """Kimi-K2 / DeepSeek-V3 forward pass in fp32, weights read from ``model_dir`` on demand."""

    def __init__(self, model_dir: str | Path) -> None:
        self.cfg = KimiConfig.from_dir(model_dir)
        self.index = CheckpointIndex.open(model_dir)
        names.validate(self.index, self.cfg)
        self.dims = MlaDims.from_config(self.cfg)
        self.routing = Routing.from_config(self.cfg)
        self.inv_freq = rope.inverse_frequencies(self.cfg)
        self.rope_scale = rope.cos_sin_scale(self.cfg)
        self.softmax_scale = rope.softmax_scale(self.cfg)

    def weight(self, name: str) -> torch.Tensor:
        """Tensor ``name`` in fp32, FP8 weights dequantised with their block scales."""
        t = self.index.read(name)
        if t.dtype != FP8_DTYPE:
            return t.float()
        assert self.cfg.quantization is not None  # validate() refuses FP8 without it
        scale = self.index.read(names.scale_name(name))
        try:
            return dequantize_blockwise(t, scale, self.cfg.quantization.block, dtype=torch.float32)
        except ValueError as exc:
            raise CheckpointError(f"{self.index.entry(name)[0]}: {name!r}: {exc}") from None

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` token ids -> ``[B, T, hidden]``, reading only the embedding rows used."""
        ids = torch.unique(tokens)
        if ids.min() < 0 or ids.max() >= self.cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size}); got {ids.min()}..{ids.max()}")
        rows = self.index.gather_rows(names.EMBED, ids.tolist()).float()
        return rows[torch.searchsorted(ids, tokens)]

    def new_cache(self, batch: int, slots: int) -> torch.Tensor:
        return torch.zeros(batch, slots, self.dims.cache_width)

    def layer(
        self,
        i: int,
        h: torch.Tensor,
        positions: torch.Tensor,
        cache: torch.Tensor,
        absorb: bool,
        valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decoder layer ``i`` on ``h [B, T, hidden]``: new hidden states, new cache, and each
        token's router choice margin ``[B, T]`` (inf in dense layers and for padding).

        ``absorb`` picks the decode form of MLA. Tokens where ``valid`` is False (padding) skip
        the MLP/MoE: their hidden states are never read, and routing them would run experts.
        """
        cfg, p = self.cfg, names.layer_prefix(i)
        cos, sin = rope.cos_sin(positions, self.inv_freq, self.rope_scale)
        x = rms_norm(h, self.weight(p + "input_layernorm.weight"), cfg.rms_norm_eps)
        attn = names.mla_weights(self.weight, cfg, i)
        out, cache = mla(x, attn, self.dims, cache, positions, cos, sin, self.softmax_scale, absorb)
        h = h + out
        x = rms_norm(h, self.weight(p + "post_attention_layernorm.weight"), cfg.rms_norm_eps).flatten(0, 1)
        rows = torch.arange(x.shape[0]) if valid is None else valid.flatten().nonzero().squeeze(1)
        mlp_out, margin = self._mlp(i, x[rows])
        mlp_out = torch.zeros_like(x).index_copy(0, rows, mlp_out)
        margins = torch.full((x.shape[0],), float("inf")).index_copy(0, rows, margin)
        return h + mlp_out.view_as(h), cache, margins.view(h.shape[:-1])

    def _mlp(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = names.layer_prefix(i) + "mlp."
        if not self.cfg.is_moe_layer(i):
            return swiglu(x, names.mlp_weights(self.weight, p)), torch.full((x.shape[0],), float("inf"))
        bias = self.weight(p + "gate.e_score_correction_bias")
        scores, choice = choice_scores(x, self.weight(p + "gate.weight"), bias, self.routing)
        weights, ids = select(scores, choice, self.routing)
        routed = routed_experts(x, weights, ids, lambda e: names.mlp_weights(self.weight, f"{p}experts.{e}."))
        shared = swiglu(x, names.mlp_weights(self.weight, p + "shared_experts."))
        return routed + shared, choice_margin(choice, self.routing.top_k)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return rms_norm(h, self.weight(names.FINAL_NORM), self.cfg.rms_norm_eps)

    def logits(self, h: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Logits of vocabulary entries ``start:stop`` for final-normed ``h [..., hidden]``."""
        return F.linear(h, self.index.read(names.LM_HEAD, start, stop).float())

    def top_logprobs(self, h: torch.Tensor, targets: torch.Tensor, k: int) -> TopLogprobs:
        """Top-``k`` log-probabilities and those of ``targets [N]`` for final-normed ``h [N, hidden]``.

        The vocabulary is scored in slices with a running log-sum-exp and top-k, so the full
        ``[N, vocab]`` logits never exist at once.
        """
        vocab = self.cfg.vocab_size
        chunk = max(1, HEAD_CHUNK_BYTES // (4 * self.cfg.hidden_size))
        n = h.shape[0]
        lse = torch.full((n,), float("-inf"))
        top_vals, top_ids = torch.empty(n, 0), torch.empty(n, 0, dtype=torch.long)
        target_logits = torch.zeros(n)
        for start in range(0, vocab, chunk):
            stop = min(start + chunk, vocab)
            logits = self.logits(h, start, stop)
            lse = torch.logaddexp(lse, logits.logsumexp(-1))
            vals = torch.cat((top_vals, logits), -1)
            ids = torch.cat((top_ids, torch.arange(start, stop).expand(n, -1)), -1)
            top_vals, best = vals.topk(min(k, vals.shape[-1]), dim=-1)
            top_ids = ids.gather(-1, best)
            here = (targets >= start) & (targets < stop)
            target_logits[here] = logits[here, targets[here] - start]
        return TopLogprobs(top_ids, top_vals - lse.unsqueeze(-1), target_logits - lse)

    def run(
        self, batch: Batch, caches: list[torch.Tensor], absorb: bool, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """All layers in memory order for ``batch``: final-normed hidden states and updated caches.

        ``positions`` defaults to the batch's own (a prefill); pass ``[B, 1]`` positions to decode.
        """
        positions = batch.positions if positions is None else positions
        h = self.embed(batch.tokens)
        out = []
        for i, cache in enumerate(caches):
            h, cache, _ = self.layer(i, h, positions, cache, absorb, batch.valid)
            out.append(cache)
        return self.final_norm(h), out
