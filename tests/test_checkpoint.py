import json
import shutil
from pathlib import Path

import pytest
import torch

from vllm_kimi_neuron.checkpoint import (
    INDEX_NAME,
    CheckpointError,
    CheckpointIndex,
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
