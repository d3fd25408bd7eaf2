"""Golden logprobs from the streaming reference, resumable layer by layer, and the golden file.

``generate`` runs the prompts through :class:`~vllm_kimi_neuron.reference.Reference`: one prefill
(decompressed MLA) gives teacher-forced log-probabilities at every prompt position, then greedy
decode steps (absorbed MLA over the cache) extend each prompt by ``max_new_tokens`` tokens. Each
step streams the whole checkpoint once, layer by layer.

After every layer the work directory receives the layer's MLA cache and then the hidden states,
each by an atomic rename, so a run killed at any moment restarts at the layer it was in; redoing
a layer is harmless because it writes the same cache slots again.

Golden file (JSON, ``format: kimi-neuron-golden/1``): per sequence the prompt and greedy
continuation token ids, and for every token after the first, the reference's log-probability of
that token given everything before it plus the top-k alternatives (``positions[i]`` predicts
``(prompt + continuation)[i + 1]``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .checkpoint import write_json, write_shard
from .reference import Batch, Reference

FORMAT = "kimi-neuron-golden/1"

Progress = Callable[[int, int, str], None]
Records = dict[str, list[dict[str, Any]]]  # step -> per sequence: scored positions, greedy next token


class GoldenError(ValueError):
    """A prompts file, golden file or work directory that cannot be used; says which and why."""


@dataclass(frozen=True)
class Position:
    """The reference's distribution for one token, given every token before it.

    ``router_margin`` is the smallest router choice margin over the MoE layers of the token
    whose hidden state predicts this one (None without MoE layers): how close the reference
    came to choosing a different expert there.
    """

    token: int
    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]
    router_margin: float | None

    @property
    def gap(self) -> float:
        """How far the best token leads the second, in nats (inf with a single candidate)."""
        return self.top_logprobs[0] - self.top_logprobs[1] if len(self.top_logprobs) > 1 else float("inf")


@dataclass(frozen=True)
class GoldenSequence:
    prompt: list[int]
    continuation: list[int]
    positions: list[Position]

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.continuation


@dataclass(frozen=True)
class Golden:
    model: str
    config_sha256: str
    top_k: int
    sequences: list[GoldenSequence]

    def save(self, path: str | Path) -> None:
        write_json(Path(path), {"format": FORMAT, **asdict(self)})

    @classmethod
    def load(cls, path: str | Path) -> Golden:
        try:
            raw = json.loads(Path(path).read_text())
            if raw.get("format") != FORMAT:
                raise GoldenError(f"{path}: format is {raw.get('format')!r}, expected {FORMAT!r}")
            sequences = [
                GoldenSequence(s["prompt"], s["continuation"], [Position(**p) for p in s["positions"]])
                for s in raw["sequences"]
            ]
            golden = cls(raw["model"], raw["config_sha256"], raw["top_k"], sequences)
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise GoldenError(
                f"{path}: not a golden file written by `kimi-neuron golden` ({exc!r})"
            ) from None
        for i, s in enumerate(golden.sequences):
            if len(s.positions) != len(s.tokens) - 1:
                raise GoldenError(f"{path}: sequence {i} has {len(s.tokens)} tokens but "
                                  f"{len(s.positions)} positions; expected one per token after the first")
        return golden


def read_prompts(path: str | Path, model_dir: str | Path) -> list[list[int]]:
    """Token ids from a JSONL file of ``{"token_ids": [...]}`` or ``{"text": "..."}`` lines.

    Text is tokenised with the checkpoint's own tokenizer, without special tokens added: the file
    says exactly what the model sees (render chat templates before writing it).
    """
    prompts: list[list[int]] = []
    texts: dict[int, str] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise GoldenError(f"{path}:{n}: not JSON ({exc})") from None
        if isinstance(item, dict) and isinstance(item.get("text"), str):
            texts[len(prompts)] = item["text"]
            prompts.append([])
        elif isinstance(item, dict) and isinstance(item.get("token_ids"), list) and item["token_ids"] and all(
            isinstance(t, int) for t in item["token_ids"]
        ):
            prompts.append(item["token_ids"])
        else:
            raise GoldenError(f'{path}:{n}: expected {{"text": "..."}} or {{"token_ids": [1, 2, ...]}}')
    if not prompts:
        raise GoldenError(f"{path}: no prompts")
    if texts:
        try:
            from transformers import AutoTokenizer, PretrainedConfig
        except ImportError:
            raise GoldenError(f"{path}: text prompts need `transformers` for the tokenizer; "
                              "install it or give token_ids") from None
        # An empty model config: transformers knows no `kimi_k2` model type, and the tokenizer is
        # chosen by tokenizer_config.json (Kimi's remote-code TikTokenTokenizer) anyway.
        tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=True, config=PretrainedConfig())
        for i, text in texts.items():
            prompts[i] = tok.encode(text, add_special_tokens=False)
            if not prompts[i]:
                raise GoldenError(f"{path}: prompt {i + 1} tokenises to nothing")
    return prompts


class _WorkDir:
    """Resumable state of one golden run: ``job.json``, ``state.safetensors``, caches, records."""

    def __init__(self, root: Path, job: dict[str, object]) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        job_path = root / "job.json"
        if job_path.exists():
            if json.loads(job_path.read_text()) != job:
                raise GoldenError(
                    f"{root} holds an unfinished run for other prompts, model or settings; "
                    "delete it or pass another --work-dir"
                )
        else:
            write_json(job_path, job)

    def cache_path(self, layer: int) -> Path:
        return self.root / f"cache-{layer:03d}.safetensors"

    def load_cache(self, layer: int) -> torch.Tensor | None:
        path = self.cache_path(layer)
        return load_file(str(path))["cache"] if path.exists() else None

    def save_cache(self, layer: int, cache: torch.Tensor) -> None:
        write_shard(self.cache_path(layer), {"cache": cache})

    def load_state(self) -> tuple[int, int, dict[str, torch.Tensor] | None]:
        """(step, next layer, hidden states and router margins entering it); (0, 0, None) fresh."""
        path = self.root / "state.safetensors"
        if not path.exists():
            return 0, 0, None
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            return int(meta["step"]), int(meta["layer"]), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118

    def save_state(self, step: int, layer: int, state: dict[str, torch.Tensor]) -> None:
        write_shard(self.root / "state.safetensors", state, metadata={"step": str(step), "layer": str(layer)})

    def load_records(self) -> Records:
        path = self.root / "records.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def save_records(self, records: Records) -> None:
        write_json(self.root / "records.json", records)


def generate(
    model_dir: str | Path,
    prompts: list[list[int]],
    work_dir: str | Path,
    max_new_tokens: int = 8,
    top_k: int = 20,
    progress: Progress | None = None,
) -> Golden:
    """Golden log-probabilities for ``prompts``; resumes from ``work_dir`` if it holds this job."""
    if top_k < 2:
        raise GoldenError("top_k must be at least 2: the top-2 gap decides which positions are near-ties")
    model_dir = Path(model_dir)
    ref = Reference(model_dir)
    config_sha = hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()
    batch = Batch.of(prompts)
    work = _WorkDir(Path(work_dir), {"format": FORMAT, "config_sha256": config_sha, "prompts": prompts,
                                     "max_new_tokens": max_new_tokens, "top_k": top_k})
    steps = max(1, max_new_tokens)  # the prefill, then one decode step per further new token
    layers = ref.cfg.num_hidden_layers
    slots = max(batch.lengths) + steps - 1
    step, layer, state = work.load_state()
    records = work.load_records()
    if progress is not None:
        resumed = f"resuming at step {step + 1}/{steps}, layer {layer}"
        progress(step * layers + layer, steps * layers, "starting" if (step, layer) == (0, 0) else resumed)
    while step < steps:
        if step == 0:
            fed, positions, valid = batch.tokens, batch.positions, batch.valid
        else:
            fed = torch.tensor([[r["next"]] for r in records[str(step - 1)]])
            positions, valid = torch.tensor(batch.lengths).unsqueeze(1) + (step - 1), None
        if state is None:
            state = {"hidden": ref.embed(fed), "margin": torch.full(fed.shape, float("inf"))}
        for i in range(layer, layers):
            cache = work.load_cache(i)
            if cache is None:
                cache = ref.new_cache(len(prompts), slots)
            h, cache, margin = ref.layer(i, state["hidden"], positions, cache, absorb=step > 0, valid=valid)
            state = {"hidden": h, "margin": torch.minimum(state["margin"], margin)}
            work.save_cache(i, cache)
            work.save_state(step, i + 1, state)
            if progress is not None:
                what = "prefill" if step == 0 else f"decode step {step}/{steps - 1}"
                progress(step * layers + i + 1, steps * layers, f"{what}, layer {i + 1}/{layers}")
        records[str(step)] = _head(ref, state, batch, step, top_k, score_last=max_new_tokens > 0)
        work.save_records(records)
        step, layer, state = step + 1, 0, None
    return _assemble(str(model_dir), config_sha, top_k, prompts, records, steps, max_new_tokens)


def _head(
    ref: Reference, state: dict[str, torch.Tensor], batch: Batch, step: int, top_k: int, score_last: bool
) -> list[dict[str, Any]]:
    """One step's log-probabilities, per sequence: its scored positions and its greedy next token.

    The prefill scores every prompt position against the next prompt token; the last position
    (and each decode step) has the greedy choice as its target, and is dropped when no new
    tokens were asked for (``score_last`` False).
    """
    h = ref.final_norm(state["hidden"])
    counts = batch.lengths if step == 0 else [1] * h.shape[0]
    rows = torch.cat([h[b, :n] for b, n in enumerate(counts)])
    # inf: no MoE layer, or every expert chosen; nothing could flip
    margins = [None if m == float("inf") else m
               for b, n in enumerate(counts) for m in state["margin"][b, :n].tolist()]
    if step == 0:
        targets = [t for b, n in enumerate(counts) for t in [*batch.tokens[b, 1:n].tolist(), -1]]
    else:
        targets = [-1] * h.shape[0]
    top = ref.top_logprobs(rows, torch.tensor(targets).clamp(min=0), top_k)
    out, start = [], 0
    for n in counts:
        end = start + n
        greedy = int(top.ids[end - 1, 0])
        tokens = [*targets[start : end - 1], greedy]
        logprobs = [*top.target_logprobs[start : end - 1].tolist(), float(top.logprobs[end - 1, 0])]
        columns = (tokens, logprobs, top.ids[start:end].tolist(), top.logprobs[start:end].tolist(),
                   margins[start:end])
        positions = [asdict(Position(*values)) for values in zip(*columns, strict=True)]
        out.append({"positions": positions if score_last else positions[:-1], "next": greedy})
        start = end
    return out


def _assemble(
    model: str, config_sha: str, top_k: int, prompts: list[list[int]], records: Records, steps: int,
    max_new_tokens: int,
) -> Golden:
    sequences = []
    for b, prompt in enumerate(prompts):
        per_step = [records[str(s)][b] for s in range(steps)]
        continuation = [int(r["next"]) for r in per_step][:max_new_tokens]
        positions = [Position(**p) for r in per_step for p in r["positions"]]
        sequences.append(GoldenSequence(prompt, continuation, positions))
    return Golden(model, config_sha, top_k, sequences)


def run(
    model_dir: str | Path, prompts_file: str | Path, out: str | Path, work_dir: str | Path | None = None,
    max_new_tokens: int = 8, top_k: int = 20, keep_work: bool = False, progress: Progress | None = None,
) -> Golden:
    """``kimi-neuron golden``: prompts file in, golden file out; the work directory is removed
    once the golden file is written unless ``keep_work``."""
    work = Path(work_dir) if work_dir is not None else Path(str(out) + ".work")
    golden = generate(model_dir, read_prompts(prompts_file, model_dir), work, max_new_tokens, top_k, progress)
    golden.save(out)
    if not keep_work:
        shutil.rmtree(work)
    return golden
