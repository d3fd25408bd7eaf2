"""Reading and writing sharded safetensors checkpoints in the Hugging Face layout.

One owner for the checkpoint's file format: the ``model.safetensors.index.json`` map from tensor
name to shard, shard-at-a-time streaming, and writing outputs so that a half-written directory can
never be taken for a complete one (temporary names, atomic renames, the index written last).
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import KimiConfig
from .fp8 import FP8_DTYPE, SCALE_SUFFIX, dequantize_blockwise

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated or inconsistent; the message names the file."""


# safetensors dtype names -> torch dtypes, for reading tensors without mapping the whole file.
DTYPES: dict[str, torch.dtype] = {
    "F8_E4M3": torch.float8_e4m3fn, "BF16": torch.bfloat16, "F16": torch.float16,
    "F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are in a safetensors file (absolute offsets)."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    stop: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """A safetensors file's tensor table, from its JSON header alone (no tensor data is read)."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    base = 8 + length
    return {
        name: TensorEntry(e["dtype"], tuple(e["shape"]), base + e["data_offsets"][0],
                          base + e["data_offsets"][1])
        for name, e in header.items()
        if name != "__metadata__"
    }


@dataclass(frozen=True)
class CheckpointIndex:
    """Which shard holds which tensor, read from the index (or a lone ``model.safetensors``)."""

    root: Path
    weight_map: dict[str, str]
    _headers: dict[str, dict[str, TensorEntry]] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def open(cls, root: str | Path) -> CheckpointIndex:
        root = Path(root)
        index_path = root / INDEX_NAME
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index_path} is not a safetensors index: {exc!r}") from None
        elif (root / SINGLE_NAME).exists():
            with _open_shard(root / SINGLE_NAME) as f:
                weight_map = dict.fromkeys(f.keys(), SINGLE_NAME)
        else:
            raise CheckpointError(f"{root} has neither {INDEX_NAME} nor {SINGLE_NAME}")
        missing = sorted({s for s in weight_map.values() if not (root / s).exists()})
        if missing:
            raise CheckpointError(f"{root}: the index names shard files that do not exist: {missing}")
        return cls(root, weight_map)

    @property
    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def tensors_in(self, shard: str) -> list[str]:
        return sorted(n for n, s in self.weight_map.items() if s == shard)

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Load the named tensors, opening each shard once; errors name the tensor and file."""
        by_shard: dict[str, list[str]] = {}
        for name in names:
            if name not in self.weight_map:
                raise CheckpointError(f"{self.root / INDEX_NAME}: no tensor named {name!r}")
            by_shard.setdefault(self.weight_map[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for shard, shard_names in by_shard.items():
            path = self.root / shard
            with _open_shard(path) as f:
                present = set(f.keys())
                for name in shard_names:
                    if name not in present:
                        raise CheckpointError(
                            f"{path}: the index says it holds {name!r}, but the file has no such tensor"
                        )
                    try:
                        out[name] = f.get_tensor(name)
                    except Exception as exc:  # safetensors raises its own error types for bad data
                        raise CheckpointError(f"{path}: cannot read tensor {name!r}: {exc}") from None
        return out


    def entry(self, name: str) -> tuple[Path, TensorEntry]:
        """The shard and byte range of tensor ``name``, checked against the file's real size."""
        if name not in self.weight_map:
            raise CheckpointError(f"{self.root / INDEX_NAME}: no tensor named {name!r}")
        shard = self.weight_map[name]
        path = self.root / shard
        if shard not in self._headers:
            self._headers[shard] = read_header(path)
        entry = self._headers[shard].get(name)
        if entry is None:
            raise CheckpointError(
                f"{path}: the index says it holds {name!r}, but the file has no such tensor"
            )
        if entry.dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {entry.dtype}")
        expected = math.prod(entry.shape) * DTYPES[entry.dtype].itemsize
        if entry.stop - entry.start != expected or entry.stop > path.stat().st_size:
            raise CheckpointError(
                f"{path}: tensor {name!r} ({entry.dtype} {list(entry.shape)}) needs bytes "
                f"{entry.start}..{entry.start + expected} but the file has {path.stat().st_size}: "
                "the shard is truncated or corrupt; download it again"
            )
        return path, entry

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Tensor ``name`` (rows ``start:stop`` of its first dim) with plain reads, not mmap.

        Memory then holds exactly the bytes asked for, and it is freed with the tensor: reading a
        1 TB checkpoint this way never keeps more than the current tensors resident.
        """
        path, entry = self.entry(name)
        rows = entry.shape[0] if entry.shape else 1
        stop = rows if stop is None else stop
        row_bytes = (entry.stop - entry.start) // max(rows, 1)
        with open(path, "rb") as f:
            data = _read_exact(f, path, name, entry.start + start * row_bytes, (stop - start) * row_bytes)
        shape = (stop - start, *entry.shape[1:]) if entry.shape else ()
        return _as_tensor(data, entry.dtype, shape)

    def gather_rows(self, name: str, rows: Sequence[int]) -> torch.Tensor:
        """``tensor[rows]`` for a 2-D tensor, reading only those rows (embedding lookups)."""
        path, entry = self.entry(name)
        row_bytes = (entry.stop - entry.start) // entry.shape[0]
        with open(path, "rb") as f:
            data = bytearray().join(
                _read_exact(f, path, name, entry.start + r * row_bytes, row_bytes) for r in rows
            )
        return _as_tensor(data, entry.dtype, (len(rows), *entry.shape[1:]))


def _read_exact(f: BinaryIO, path: Path, name: str, offset: int, size: int) -> bytearray:
    buf = bytearray(size)
    f.seek(offset)
    if f.readinto(buf) != size:
        raise CheckpointError(
            f"{path}: tensor {name!r} ends past the end of the file: the shard is truncated"
        )
    return buf


def _as_tensor(data: bytearray, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    if not data:
        return torch.empty(shape, dtype=DTYPES[dtype])
    return torch.frombuffer(data, dtype=torch.uint8).view(DTYPES[dtype]).reshape(shape)


def _open_shard(path: Path):  # noqa: ANN202 -- safe_open's handle type is private
    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def assign_shards(groups: dict[str, int], num_shards: int) -> dict[str, str]:
    """Spread tensors over ``num_shards`` files by group (e.g. layer), keeping each group whole.

    ``groups`` maps tensor name -> group number (ascending through the model); consecutive groups
    share a file, as in the real checkpoint where a layer's weights and scales sit together.
    """
    ordered = sorted(set(groups.values()))
    count = min(num_shards, len(ordered))
    shard_of = {g: i * count // len(ordered) + 1 for i, g in enumerate(ordered)}
    return {
        name: f"model-{shard_of[g]:05d}-of-{count:06d}.safetensors" for name, g in groups.items()
    }


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file under a temporary name and rename it into place."""
    tmp = path.with_name(path.name + ".partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"format": "pt", **(metadata or {})})
    tmp.chmod(0o644)  # safetensors creates 0600; servers often run as another user
    tmp.replace(path)


def write_json(path: Path, obj: object) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def write_index(root: Path, weight_map: dict[str, str], total_size: int) -> None:
    write_json(
        root / INDEX_NAME,
        {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))},
    )


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def shard_tensor_bytes(path: Path) -> dict[str, int]:
    """Byte size of every tensor in a shard, from its header alone (no tensor data is read)."""
    return {name: e.stop - e.start for name, e in read_header(path).items()}


def dequantize_shard(
    index: CheckpointIndex, shard: str, block: tuple[int, int]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the shard's tensors with FP8 weights dequantised to BF16 and scale tensors dropped."""
    names = index.tensors_in(shard)
    tensors = index.load(names)
    for name in names:
        if name.endswith(SCALE_SUFFIX):
            weight = name[: -len(SCALE_SUFFIX)] + "weight"
            if weight not in index.weight_map:
                raise CheckpointError(f"{index.root / shard}: {name!r} has no matching {weight!r}")
            continue
        t = tensors[name]
        if t.dtype == FP8_DTYPE:
            scale_name = name[: -len("weight")] + SCALE_SUFFIX
            if scale_name not in index.weight_map:
                raise CheckpointError(
                    f"{index.root / shard}: FP8 tensor {name!r} has no {scale_name!r}; "
                    "the checkpoint is incomplete or not in the block-FP8 format"
                )
            scale = tensors.get(scale_name)
            if scale is None:
                scale = index.load([scale_name])[scale_name]
            try:
                t = dequantize_blockwise(t, scale, block)
            except ValueError as exc:
                raise CheckpointError(f"{index.root / shard}: {name!r}: {exc}") from None
        yield name, t


def convert_to_bf16(
    src: str | Path,
    dst: str | Path,
    progress: Callable[[int, int, str], None] | None = None,
) -> Path:
    """Dequantise a block-FP8 checkpoint into a BF16 one, one shard at a time.

    Output shards keep their input names. A shard already present in ``dst`` is complete (it was
    renamed into place only after being written whole), so a rerun after an interruption continues
    where it stopped. ``config.json`` and the index are written last: until they exist, no loader
    sees ``dst`` as a model.
    """
    src, dst = Path(src), Path(dst)
    config = KimiConfig.from_dir(src)
    if config.quantization is None:
        raise CheckpointError(f"{src / 'config.json'} has no quantization_config: nothing to dequantise")
    index = CheckpointIndex.open(src)
    dst.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total_size = 0
    shards = index.shards
    for i, shard in enumerate(shards):
        out_path = dst / shard
        if out_path.exists():
            sizes = shard_tensor_bytes(out_path)
            weight_map.update({n: shard for n in sizes})
            total_size += sum(sizes.values())
        else:
            tensors = dict(dequantize_shard(index, shard, config.quantization.block))
            write_shard(out_path, tensors)
            weight_map.update({n: shard for n in tensors})
            total_size += sum(_tensor_bytes(t) for t in tensors.values())
        if progress is not None:
            progress(i + 1, len(shards), shard)
    for item in sorted(src.iterdir()):
        if item.is_file() and not item.name.endswith(".safetensors") and item.name not in (
            INDEX_NAME,
            "config.json",
        ):
            shutil.copy2(item, dst / item.name)
    write_index(dst, weight_map, total_size)
    raw = json.loads((src / "config.json").read_text())
    raw.pop("quantization_config")
    write_json(dst / "config.json", raw)
    return dst
