"""Reading and writing sharded safetensors checkpoints.

One owner for the file format: the ``model.safetensors.index.json`` map from tensor name to shard,
tensor-at-a-time reads with plain file reads (no mmap, so memory holds only what was asked for)
and errors that name the file and tensor, writes under temporary names renamed into place,
checksums, and byte-level merging of safetensors files.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import safe_open

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
        """Load the named tensors; errors name the tensor and the file."""
        return {name: self.read(name) for name in names}

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




def shard_file_names(num_groups: int, num_shards: int) -> list[str]:
    """File name for each of ``num_groups`` consecutive groups (e.g. layers) spread evenly over
    ``num_shards`` files, as in the real checkpoint where a layer's weights and scales sit together."""
    count = min(num_shards, num_groups)
    return [f"model-{g * count // num_groups + 1:05d}-of-{count:06d}.safetensors" for g in range(num_groups)]


_SAFETENSORS_DTYPES = {torch_dtype: name for name, torch_dtype in DTYPES.items()}


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file under a temporary name and rename it into place.

    Tensor bytes go straight from each tensor's memory to the file (safetensors' own writer
    first copies every tensor into a bytes object, doubling peak memory for large groups).
    Larger element types come first so every tensor starts aligned to its element size.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
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
