"""Reading and writing sharded safetensors checkpoints.

One owner for the file format: the ``model.safetensors.index.json`` map from tensor name to shard,
tensor-at-a-time reads with errors that name the file and tensor, writes under temporary names
renamed into place, checksums, and byte-level merging of safetensors files.
"""

from __future__ import annotations

import errno
import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated or inconsistent; the message names the file."""


@dataclass(frozen=True)
class CheckpointIndex:
    """Which shard holds which tensor, read from the index (or a lone ``model.safetensors``)."""

    root: Path
    weight_map: dict[str, str]

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
        """Load the named tensors; errors name the tensor and the file."""
        with ShardReader(self) as reader:
            return {name: reader.get(name) for name in names}


class ShardReader:
    """Reads tensors one at a time, keeping each shard open until the reader is closed."""

    def __init__(self, index: CheckpointIndex) -> None:
        self.index = index
        self._handles: dict[str, Any] = {}

    def get(self, name: str) -> torch.Tensor:
        shard = self.index.weight_map.get(name)
        if shard is None:
            raise CheckpointError(f"{self.index.root / INDEX_NAME}: no tensor named {name!r}")
        path = self.index.root / shard
        if shard not in self._handles:
            handle = _open_shard(path)
            self._handles[shard] = (handle, set(handle.keys()))
        handle, present = self._handles[shard]
        if name not in present:
            raise CheckpointError(
                f"{path}: the index says it holds {name!r}, but the file has no such tensor")
        try:
            return handle.get_tensor(name)
        except Exception as exc:  # safetensors raises its own error types for bad data
            raise CheckpointError(f"{path}: cannot read tensor {name!r}: {exc}") from None

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_shard(path: Path) -> Any:  # safe_open's handle type is not exported
    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def shard_file_names(num_groups: int, num_shards: int) -> list[str]:
    """File name for each of ``num_groups`` consecutive groups (e.g. layers) spread evenly over
    ``num_shards`` files, as in the real checkpoint where a layer's weights and scales sit together."""
    count = min(num_shards, num_groups)
    return [f"model-{g * count // num_groups + 1:05d}-of-{count:06d}.safetensors" for g in range(num_groups)]


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
    torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write one safetensors file under a temporary name and rename it into place.

    Tensor bytes go straight from each tensor's memory to the file (safetensors' own writer
    first copies every tensor into a bytes object, doubling peak memory for large groups).
    Larger element types come first so every tensor starts aligned to its element size.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(path.name + ".partial")
    try:
        with tmp.open("wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for name in order:
                t = tensors[name].contiguous()
                if t.numel():
                    f.write(t.reshape(-1).view(torch.uint8).numpy().data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.chmod(0o644)
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


_OUT_OF_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def out_of_space_error(path: Path, exc: OSError) -> CheckpointError:
    """The error to raise when writing ``path`` failed for lack of space."""
    return CheckpointError(
        f"{path}: no space left while writing ({exc.strerror}); free space on that filesystem and "
        "rerun the same command: finished files are kept and not redone"
    )


def is_out_of_space(exc: OSError) -> bool:
    return exc.errno in _OUT_OF_SPACE


def file_digest(path: Path, chunk: int = 1 << 24) -> dict[str, object]:
    """sha256 and size of a file, read in 16 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
    return {"sha256": h.hexdigest(), "bytes": size}


def read_header(path: Path) -> tuple[dict[str, dict], int]:
    """A safetensors file's header (tensor name -> dtype/shape/offsets) and where its data starts."""
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated: shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def merge_safetensors(parts: list[Path], out: Path) -> None:
    """Concatenate safetensors files into one by copying their bytes (memory stays constant)."""
    entries: dict[str, dict] = {}
    sources: list[tuple[Path, int, int]] = []
    offset = 0
    for part in parts:
        header, start = read_header(part)
        end = max((t["data_offsets"][1] for t in header.values()), default=0)
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if name in entries:
                raise CheckpointError(f"{part}: tensor {name!r} also appears in an earlier part")
            b, e = info["data_offsets"]
            entries[name] = {**info, "data_offsets": [b + offset, e + offset]}
        sources.append((part, start, end))
        offset += end
    blob = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data section 8-byte aligned
    tmp = out.with_name(out.name + ".partial")
    with tmp.open("wb") as dst:
        dst.write(struct.pack("<Q", len(blob)) + blob)
        for part, start, length in sources:
            with part.open("rb") as src:
                src.seek(start)
                left = length
                while left:
                    block = src.read(min(left, 1 << 24))
                    if not block:
                        raise CheckpointError(f"{part}: truncated: data ends {left} bytes early")
                    dst.write(block)
                    left -= len(block)
    tmp.chmod(0o644)
    tmp.replace(out)
