"""Offline checkpoint conversion: block-FP8 Kimi-K2 -> ``bf16`` or ``neuron-fp8``; plus ``verify``.

The ``neuron-fp8`` output is one unsharded checkpoint in NxD's names and dtypes: NxDI's own compile
shards it per rank (``save_sharded_checkpoint``: NxD's ``ModelBuilder.shard_checkpoint``, which also
writes the per-rank state NxD modules need), and later starts load those shards.

Work is split into groups (one per decoder layer, one for embeddings/norm/lm_head). A group is read
tensor by tensor from the input shards (a layer may span two), converted, written under a temporary
name, renamed, and recorded in ``.kimi-convert/done/``; a rerun skips recorded groups, so a killed
conversion resumes where it stopped. Peak memory per worker is about one group's output plus one
input tensor and its fp32 dequantisation. ``kimi_neuron_manifest.json`` (per-file sha256, every
tensor's dtype and shape) is written last: without it no loader accepts the directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .checkpoint import (
    INDEX_NAME,
    CheckpointError,
    CheckpointIndex,
    TensorEntry,
    file_digest,
    is_out_of_space,
    out_of_space_error,
    read_header,
    write_index,
    write_json,
    write_shard,
)
from .config import KimiConfig
from .fp8 import FP8_DTYPE, SCALE_SUFFIX, dequantize_blockwise, quantize_per_channel
from .layout import EXPERTS, neuron_names

FORMATS = ("bf16", "neuron-fp8")
MANIFEST = "kimi_neuron_manifest.json"
STATE = ".kimi-convert"
_DTYPE_NAMES = {"BF16": "bf16", "F32": "fp32", "F8_E4M3": "fp8", "F16": "fp16"}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class Group:
    key: str
    layer: int | None
    names: tuple[str, ...]


def plan_groups(index: CheckpointIndex, cfg: KimiConfig) -> list[Group]:
    """One group for the embeddings/final norm/lm_head, then one per decoder layer."""
    by_layer: dict[int | None, list[str]] = {}
    for name in index.weight_map:
        m = _LAYER.match(name)
        by_layer.setdefault(int(m.group(1)) if m else None, []).append(name)
    extra = sorted(k for k in by_layer if k is not None and k >= cfg.num_hidden_layers)
    if extra:
        # DeepSeek-V3's multi-token-prediction layer sits after the last decoder layer; serving
        # does not use it.
        print(f"note: skipping layers {extra} (beyond num_hidden_layers={cfg.num_hidden_layers})",
              file=sys.stderr)
    missing = [i for i in range(cfg.num_hidden_layers) if i not in by_layer]
    if missing:
        raise CheckpointError(f"{index.root / INDEX_NAME}: no tensors for layers {missing}")
    groups = [Group("globals", None, tuple(sorted(by_layer.get(None, []))))]
    groups += [Group(f"layer-{i:03d}", i, tuple(sorted(by_layer[i])))
               for i in range(cfg.num_hidden_layers)]
    return groups


def converted_dir(model_dir: Path) -> Path:
    """Where the Neuron mode keeps the ``neuron-fp8`` conversion of ``model_dir``:
    ``$KIMI_NEURON_CHECKPOINT`` if set, else under the package's cache home."""
    if "KIMI_NEURON_CHECKPOINT" in os.environ:
        return Path(os.environ["KIMI_NEURON_CHECKPOINT"])
    from .config import cache_home

    # A Hugging Face snapshot directory is named by its commit: keep the repository name too.
    name = model_dir.name if model_dir.parent.name != "snapshots" else (
        f"{model_dir.parent.parent.name.removeprefix('models--')}-{model_dir.name[:12]}")
    return cache_home() / "converted" / f"{name}-neuron-fp8"


def ensure_converted(model_dir: Path, workers: int | None = None,
                     on_progress: ProgressFn | None = None) -> Path:
    """The complete ``neuron-fp8`` conversion of ``model_dir``, made (or finished after an
    interruption) first if needed; a no-op beyond one manifest check once it exists."""
    return convert(model_dir, converted_dir(model_dir), "neuron-fp8",
                   workers=workers or max(1, (os.cpu_count() or 2) // 2), on_progress=on_progress)


# -- per-group conversion (runs in worker processes) ---------------------------------------------

class _Reader:
    """Loads one checkpoint tensor at a time, dequantising FP8 weights with their block scales."""

    def __init__(self, index: CheckpointIndex, cfg: KimiConfig) -> None:
        self.index, self.cfg = index, cfg
        self.bytes_read = 0

    def raw(self, name: str) -> torch.Tensor:
        t = self.index.read(name)
        self.bytes_read += t.numel() * t.element_size()
        return t

    def full(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        t = self.raw(name)
        if t.dtype != FP8_DTYPE:
            return t.to(dtype)
        return self._with_scale(name, lambda s, block: dequantize_blockwise(t, s, block, dtype))

    def per_channel_t(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight ``name`` ``[out, in]`` quantised for Neuron and transposed to ``[in, out]``, as
        NxD's expert linears keep it, with its ``[1, out]`` scales."""
        t = self.raw(name)
        if t.dtype != FP8_DTYPE:
            return quantize_per_channel(t, transpose=True)
        return self._with_scale(name, lambda s, block: quantize_per_channel(t, s, block, transpose=True))

    def _with_scale(self, name: str, fn: Callable[[torch.Tensor, tuple[int, int]], Any]) -> Any:
        """``fn(scale_inv, block)`` for FP8 tensor ``name``; a missing or misshapen scale is named."""
        scale_name = name[: -len("weight")] + SCALE_SUFFIX
        if scale_name not in self.index.weight_map:
            raise CheckpointError(
                f"{self.index.root / self.index.weight_map[name]}: FP8 tensor {name!r} has no "
                f"{scale_name!r}; the checkpoint is incomplete or not in the block-FP8 format"
            )
        assert self.cfg.quantization is not None
        try:
            return fn(self.raw(scale_name), self.cfg.quantization.block)
        except ValueError as exc:
            raise CheckpointError(
                f"{self.index.root / self.index.weight_map[name]}: {name!r}: {exc}") from None


def _bf16_group(reader: _Reader, group: Group) -> Iterator[tuple[str, torch.Tensor]]:
    for name in group.names:
        if name.endswith("e_score_correction_bias"):
            yield name, reader.raw(name)  # stays fp32, as in the checkpoint
        elif not name.endswith(SCALE_SUFFIX):
            yield name, reader.full(name, torch.bfloat16)


def _neuron_group(reader: _Reader, group: Group) -> Iterator[tuple[str, torch.Tensor]]:
    cfg = reader.cfg
    expert = re.compile(r"\.mlp\.experts\.\d+\.")
    for name in group.names:
        if name.endswith(SCALE_SUFFIX) or expert.search(name):
            continue
        short = name.removeprefix("model.")
        if name.endswith("mlp.gate.weight"):
            yield short.replace("mlp.gate.weight", "mlp.router.linear_router.weight"), \
                reader.full(name, torch.bfloat16)
        elif name.endswith("mlp.gate.e_score_correction_bias"):
            # Used only to choose experts, never added to the router logits: named accordingly.
            yield short.replace("mlp.gate.e_score_correction_bias", "mlp.router.selection_bias"), \
                reader.raw(name).float()
        else:
            yield short, reader.full(name, torch.bfloat16)
    if group.layer is None or not cfg.is_moe_layer(group.layer):
        return
    e_count, h, inter = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    gate_up = torch.empty(e_count, h, 2 * inter, dtype=FP8_DTYPE)
    gate_up_scale = torch.empty(e_count, 1, 2 * inter)
    down = torch.empty(e_count, inter, h, dtype=FP8_DTYPE)
    down_scale = torch.empty(e_count, 1, h)
    p = f"model.layers.{group.layer}.mlp.experts."
    for e in range(e_count):  # one expert weight at a time bounds the intermediates
        gate_up[e, :, :inter], gate_up_scale[e, :, :inter] = reader.per_channel_t(f"{p}{e}.gate_proj.weight")
        gate_up[e, :, inter:], gate_up_scale[e, :, inter:] = reader.per_channel_t(f"{p}{e}.up_proj.weight")
        down[e], down_scale[e] = reader.per_channel_t(f"{p}{e}.down_proj.weight")
    prefix = f"layers.{group.layer}.{EXPERTS}"
    yield prefix + "gate_up_proj.weight", gate_up
    yield prefix + "gate_up_proj.scale", gate_up_scale
    yield prefix + "down_proj.weight", down
    yield prefix + "down_proj.scale", down_scale


def _dtype_name(t: torch.Tensor) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32", FP8_DTYPE: "fp8"}[t.dtype]


@dataclass(frozen=True)
class _Job:
    src: str
    dst: str
    fmt: str
    group: Group
    file_name: str


def _run_group(job: _Job) -> dict[str, Any]:
    """Convert one group and record it as done; returns the record."""
    if os.environ.get("KIMI_NEURON_CONVERT_WORKER_THREADS"):
        torch.set_num_threads(int(os.environ["KIMI_NEURON_CONVERT_WORKER_THREADS"]))
    cfg = KimiConfig.from_dir(job.src)
    reader = _Reader(CheckpointIndex.open(job.src), cfg)
    convert_fn = _bf16_group if job.fmt == "bf16" else _neuron_group
    tensors = dict(convert_fn(reader, job.group))
    path = Path(job.dst) / job.file_name
    try:
        write_shard(path, tensors)
    except OSError as exc:
        if is_out_of_space(exc):
            raise out_of_space_error(path, exc) from None
        raise
    record = {
        "files": {job.file_name: file_digest(path)},
        "tensors": {n: [_dtype_name(t), list(t.shape)] for n, t in tensors.items()},
        "bytes_in": reader.bytes_read,
    }
    write_json(Path(job.dst) / STATE / "done" / f"{job.group.key}.json", record)
    return record


# -- orchestration --------------------------------------------------------------------------------

class Progress:
    """Bytes done out of a total, with rate and ETA, on one stderr line (one line per update
    when stderr is not a terminal, so logs stay readable)."""

    def __init__(self, total: int, what: str) -> None:
        self.total, self.what, self.done = total, what, 0
        self.start = time.monotonic()
        self.tty = sys.stderr.isatty()

    def update(self, n: int, note: str = "") -> None:
        self.done += n
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        line = (f"{self.what}: {pct:5.1f}% {self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB "
                f"{rate / 1e6:.0f} MB/s ETA {eta:.0f} s {note}")
        print(("\r" + line.ljust(100)) if self.tty else line, end="" if self.tty else "\n",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def _plan_record(src: Path, fmt: str) -> dict[str, Any]:
    return {
        "format": fmt,
        # Always null: kept so that conversions made while pre-sharding existed are still recognised.
        "layout": None,
        "source": {
            "path": str(src.resolve()),
            "config_sha256": file_digest(src / "config.json")["sha256"],
            "index_sha256": file_digest(src / INDEX_NAME)["sha256"] if (src / INDEX_NAME).exists() else None,
        },
    }


def _start_state(dst: Path, plan: dict[str, Any]) -> None:
    """Create or re-enter the state directory; refuse to mix two different conversions."""
    state = dst / STATE
    plan_path = state / "plan.json"
    if plan_path.exists():
        old = json.loads(plan_path.read_text())
        if old != plan:
            raise CheckpointError(
                f"{dst} holds an unfinished conversion with other parameters ({old['format']}, "
                f"layout {old['layout']}, from {old['source']['path']}); use another --out "
                "directory or delete this one"
            )
    elif dst.exists() and any(p.name != STATE for p in dst.iterdir()):
        raise CheckpointError(f"{dst} exists and is not empty; choose a new --out directory")
    (state / "done").mkdir(parents=True, exist_ok=True)
    write_json(plan_path, plan)


def _group_file(fmt: str, group: Group, position: int, count: int) -> str:
    if fmt == "bf16":
        return f"model-{position + 1:05d}-of-{count:05d}.safetensors"
    return f"neuron-{group.key}.safetensors"


def convert(
    src: str | Path,
    dst: str | Path,
    fmt: str,
    workers: int = 1,
    show_progress: bool = True,
    on_progress: ProgressFn | None = None,
) -> Path:
    """Convert ``src`` (block-FP8 Kimi-K2 / DeepSeek-V3) to ``fmt`` in ``dst``; rerun to resume.

    ``on_progress(done_bytes, total_bytes)`` is called as input groups finish (and once at the
    start, with what an earlier run already did)."""
    src, dst = Path(src), Path(dst)
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    cfg = KimiConfig.from_dir(src)
    if cfg.quantization is None:
        raise CheckpointError(f"{src / 'config.json'} has no quantization_config: nothing to convert")
    index = CheckpointIndex.open(src)
    groups = plan_groups(index, cfg)
    plan = _plan_record(src, fmt)
    if (dst / MANIFEST).exists() and (dst / STATE / "plan.json").exists() and \
            json.loads((dst / STATE / "plan.json").read_text()) == plan:
        print(f"{dst} is already a complete conversion; nothing to do", file=sys.stderr)
        return dst
    _start_state(dst, plan)
    done_dir = dst / STATE / "done"
    todo = [g for g in groups if not (done_dir / f"{g.key}.json").exists()]
    sizes = _group_input_bytes(index, groups)
    progress = Progress(sum(sizes.values()), f"convert {fmt}") if show_progress else None
    if progress is not None and len(todo) < len(groups):
        progress.update(sum(sizes[g.key] for g in groups if g not in todo),
                        f"(resumed: {len(groups) - len(todo)} groups already done)")
    jobs = [_Job(str(src), str(dst), fmt, g, _group_file(fmt, g, groups.index(g), len(groups))) for g in todo]
    total = sum(sizes.values())
    done = [total - sum(sizes[g.key] for g in todo)]

    def finished(job: _Job) -> None:
        done[0] += sizes[job.group.key]
        if progress is not None:
            progress.update(sizes[job.group.key], job.group.key)
        if on_progress is not None:
            on_progress(done[0], total)

    if on_progress is not None:
        on_progress(done[0], total)
    _run_jobs(jobs, workers, finished)
    if progress is not None:
        progress.close()
    records = {g.key: json.loads((done_dir / f"{g.key}.json").read_text()) for g in groups}
    files: dict[str, Any] = {}
    tensors: dict[str, Any] = {}
    for g in groups:
        files.update(records[g.key]["files"])
        tensors.update(records[g.key]["tensors"])
    _finish(src, dst, plan, files, tensors)
    return dst


def _group_input_bytes(index: CheckpointIndex, groups: list[Group]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    headers: dict[str, dict[str, TensorEntry]] = {}
    for g in groups:
        total = 0
        for name in g.names:
            shard = index.weight_map[name]
            if shard not in headers:
                headers[shard] = read_header(index.root / shard)
            info = headers[shard].get(name)
            if info is not None:
                total += info.stop - info.start
        sizes[g.key] = total
    return sizes


def _run_jobs(jobs: list[_Job], workers: int, on_done: Callable[[_Job], object]) -> None:
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            _run_group(job)
            on_done(job)
        return
    # Spawned (not forked) workers: torch's thread pools do not survive fork safely. Each worker
    # gets its share of the cores so N workers do not oversubscribe them.
    threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ["KIMI_NEURON_CONVERT_WORKER_THREADS"] = str(threads)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(_run_group, job): job for job in jobs}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for fut in finished:
                fut.result()  # re-raises a worker's CheckpointError here, naming the file
                on_done(futures[fut])


def _finish(src: Path, dst: Path, plan: dict[str, Any], files: dict[str, Any],
            tensors: dict[str, Any]) -> None:
    """Copy tokenizer and other small files, write the index and config.json, then the manifest:
    last, because its presence is what marks the directory complete."""
    for item in sorted(src.iterdir()):
        if item.is_file() and not item.name.endswith(".safetensors") and item.name not in (
                INDEX_NAME, "config.json", MANIFEST):
            shutil.copy2(item, dst / item.name)
    weight_map = {}
    for rel in files:
        weight_map.update(dict.fromkeys(read_header(dst / rel), rel))
    write_index(dst, weight_map, sum(int(f["bytes"]) for f in files.values()))
    raw = json.loads((src / "config.json").read_text())
    if plan["format"] == "bf16":
        raw.pop("quantization_config", None)
    write_json(dst / "config.json", raw)
    for name in sorted(p.name for p in dst.iterdir() if p.is_file() and p.name != MANIFEST):
        files.setdefault(name, file_digest(dst / name))
    write_json(dst / MANIFEST, {
        **plan,
        "package_version": __version__,
        "files": dict(sorted(files.items())),
        "tensors": dict(sorted(tensors.items())),
    })


# -- verify ---------------------------------------------------------------------------------------

class VerifyError(CheckpointError):
    """A converted directory that is incomplete or altered; the message lists every problem."""


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The manifest of a finished conversion; refuses directories without one (partial output)."""
    path = Path(root) / MANIFEST
    if not path.exists():
        raise VerifyError(
            f"{root} has no {MANIFEST}: it is not a finished conversion (an interrupted run leaves "
            "no manifest); rerun `kimi-neuron convert` with the same arguments to complete it"
        )
    return json.loads(path.read_text())


def verify(root: str | Path, checksums: bool = True) -> dict[str, Any]:
    """Check a converted directory against its manifest: files, sizes, checksums, tensor dtypes and
    shapes, and completeness against the model's config. Raises VerifyError listing all problems."""
    root = Path(root)
    manifest = read_manifest(root)
    problems: list[str] = []
    for rel, want in manifest["files"].items():
        path = root / rel
        if not path.exists():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != want["bytes"]:
            problems.append(f"{rel}: {path.stat().st_size} bytes, manifest says {want['bytes']}")
        elif checksums and file_digest(path)["sha256"] != want["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest (file altered or corrupt)")
    tensors = {n: (d, tuple(s)) for n, (d, s) in manifest["tensors"].items()}
    cfg = KimiConfig.from_dir(root)
    fmt = manifest["format"]
    expected = neuron_names(cfg) if fmt == "neuron-fp8" else None
    if expected is not None:
        for name in sorted(expected.keys() - tensors.keys()):
            problems.append(f"tensor {name}: missing from the conversion")
        for name in sorted(tensors.keys() & expected.keys()):
            if tensors[name] != expected[name]:
                problems.append(f"tensor {name}: {tensors[name]} but the config needs {expected[name]}")
    if manifest["layout"] is not None:
        problems.append(f"pre-sharded for {manifest['layout']} by an earlier vllm-kimi-neuron: nothing "
                        "loads that layout any more (NxDI's compile shards the unsharded conversion); "
                        "convert again")
    safetensors_files = [rel for rel in manifest["files"] if rel.endswith(".safetensors")
                         and (root / rel).exists()]
    seen: dict[str, int] = {}
    for rel in safetensors_files:
        header = read_header(root / rel)
        for name, info in header.items():
            seen[name] = seen.get(name, 0) + 1
            if name not in tensors:
                problems.append(f"{rel}: tensor {name} is not in the manifest")
                continue
            dtype, shape = tensors[name]
            got = (_DTYPE_NAMES.get(info.dtype, info.dtype), info.shape)
            if got != (dtype, shape):
                problems.append(f"{rel}: tensor {name} is {got}, expected {(dtype, shape)}")
    for name in sorted(tensors):
        if seen.get(name, 0) != 1:
            problems.append(f"tensor {name}: found in {seen.get(name, 0)} files, expected 1")
    if problems:
        raise VerifyError(f"{root}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return manifest


def tensor_bytes(entry: list[Any]) -> int:
    dtype, shape = entry
    n = 1
    for d in shape:
        n *= d
    return n * {"bf16": 2, "fp32": 4, "fp8": 1, "fp16": 2}[dtype]
