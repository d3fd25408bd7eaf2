import json
import shutil
from pathlib import Path

import pytest
import torch

from vllm_kimi_neuron.checkpoint import (
    INDEX_NAME,
    CheckpointError,
    CheckpointIndex,
    merge_safetensors,
    read_header,
)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_shard_is_named(tiny_fp8: Path, tmp_path: Path) -> None:
    bad = _copy(tiny_fp8, tmp_path / "m")
    (bad / "model-00002-of-000004.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-000004\.safetensors"):
        CheckpointIndex.open(bad)


def test_index_pointing_at_absent_tensor_is_named(tiny_fp8: Path, tmp_path: Path) -> None:
    bad = _copy(tiny_fp8, tmp_path / "m")
    index = json.loads((bad / INDEX_NAME).read_text())
    index["weight_map"]["model.layers.1.mlp.ghost.weight"] = "model-00002-of-000004.safetensors"
    (bad / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"00002-of-000004.safetensors.*ghost"):
        CheckpointIndex.open(bad).load(["model.layers.1.mlp.ghost.weight"])
    with pytest.raises(CheckpointError, match="no tensor named 'nope'"):
        CheckpointIndex.open(bad).load(["nope"])


def test_single_file_checkpoint_without_index(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"a": torch.ones(2), "b": torch.zeros(3)}, str(tmp_path / "model.safetensors"))
    index = CheckpointIndex.open(tmp_path)
    assert index.shards == ["model.safetensors"]
    assert torch.equal(index.load(["b"])["b"], torch.zeros(3))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither"):
        CheckpointIndex.open(tmp_path)


def test_truncated_shard_is_named(tiny_fp8: Path, tmp_path: Path) -> None:
    bad = _copy(tiny_fp8, tmp_path / "m")
    shard = bad / "model-00003-of-000004.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model-00003-of-000004\.safetensors"):
        CheckpointIndex.open(bad).load(["model.layers.2.self_attn.o_proj.weight"])


def test_merge_safetensors_keeps_every_tensor(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    a = {"x": torch.arange(6, dtype=torch.float32).view(2, 3), "y": torch.ones(5, dtype=torch.bfloat16)}
    b = {"z": torch.arange(7, dtype=torch.int64)}
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    merge_safetensors([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], tmp_path / "m.safetensors")
    merged = load_file(str(tmp_path / "m.safetensors"))
    assert merged.keys() == {"x", "y", "z"}
    for k, v in (a | b).items():
        assert torch.equal(merged[k], v) and merged[k].dtype == v.dtype
    assert min(e.start for e in read_header(tmp_path / "m.safetensors").values()) % 8 == 0  # aligned data
    with pytest.raises(CheckpointError, match="also appears"):
        merge_safetensors([tmp_path / "a.safetensors"] * 2, tmp_path / "dup.safetensors")
