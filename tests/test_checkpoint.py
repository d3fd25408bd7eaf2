import json
import shutil
from pathlib import Path

import pytest
import torch

from vllm_kimi_neuron.checkpoint import INDEX_NAME, CheckpointError, CheckpointIndex, convert_to_bf16
from vllm_kimi_neuron.fp8 import FP8_DTYPE


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_bf16_equals_blockwise_dequantisation(tiny_fp8: Path, tiny_bf16: Path) -> None:
    src, out = CheckpointIndex.open(tiny_fp8), CheckpointIndex.open(tiny_bf16)
    assert not any(n.endswith("weight_scale_inv") for n in out.weight_map)
    assert set(out.weight_map) == {n for n in src.weight_map if not n.endswith("_scale_inv")}
    assert "quantization_config" not in json.loads((tiny_bf16 / "config.json").read_text())
    name = "model.layers.2.mlp.experts.3.down_proj.weight"  # 256x128: two column blocks
    t = src.load([name, name + "_scale_inv"])
    q, scale = t[name], t[name + "_scale_inv"]
    expected = torch.cat([q[:128].float() * scale[0, 0], q[128:].float() * scale[1, 0]])
    assert torch.equal(out.load([name])[name], expected.to(torch.bfloat16))
    for keep in ("model.layers.1.mlp.gate.e_score_correction_bias", "lm_head.weight"):
        assert torch.equal(out.load([keep])[keep], src.load([keep])[keep])
    assert (tiny_bf16 / "tokenizer.json").read_bytes() == (tiny_fp8 / "tokenizer.json").read_bytes()


def test_convert_resumes_after_interruption(tiny_fp8: Path, tiny_bf16: Path, tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    out.mkdir()
    done = sorted(tiny_bf16.glob("*.safetensors"))[:2]
    for shard in done:
        shutil.copy2(shard, out / shard.name)
    (out / (done[-1].name + ".partial")).write_bytes(b"half a shard")  # an interrupted write
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    seen: list[str] = []
    convert_to_bf16(tiny_fp8, out, progress=lambda i, n, shard: seen.append(shard))
    assert len(seen) == 4
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors") if p.name in before} == before
    assert json.loads((out / INDEX_NAME).read_text()) == json.loads((tiny_bf16 / INDEX_NAME).read_text())


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


def test_truncated_shard_is_named(tiny_fp8: Path, tmp_path: Path) -> None:
    bad = _copy(tiny_fp8, tmp_path / "m")
    shard = bad / "model-00003-of-000004.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model-00003-of-000004\.safetensors"):
        convert_to_bf16(bad, tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()  # never looks complete


def test_fp8_weight_without_scale_is_refused(tiny_fp8: Path, tmp_path: Path) -> None:
    bad = _copy(tiny_fp8, tmp_path / "m")
    index = json.loads((bad / INDEX_NAME).read_text())
    del index["weight_map"]["model.layers.1.self_attn.o_proj.weight_scale_inv"]
    (bad / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"o_proj\.weight_scale_inv"):
        convert_to_bf16(bad, tmp_path / "out")


def test_unquantised_checkpoint_is_refused(tiny_bf16: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no quantization_config"):
        convert_to_bf16(tiny_bf16, tmp_path / "out")
    assert CheckpointIndex.open(tiny_bf16).load(["model.layers.1.self_attn.o_proj.weight"])[
        "model.layers.1.self_attn.o_proj.weight"].dtype != FP8_DTYPE


def test_single_file_checkpoint_without_index(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"a": torch.ones(2), "b": torch.zeros(3)}, str(tmp_path / "model.safetensors"))
    index = CheckpointIndex.open(tmp_path)
    assert index.shards == ["model.safetensors"]
    assert torch.equal(index.load(["b"])["b"], torch.zeros(3))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither"):
        CheckpointIndex.open(tmp_path)
