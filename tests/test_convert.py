import json
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vllm_kimi_neuron.checkpoint import INDEX_NAME, CheckpointError, CheckpointIndex, read_header
from vllm_kimi_neuron.config import KimiConfig
from vllm_kimi_neuron.convert import (
    FORMATS,
    MANIFEST,
    STATE,
    VerifyError,
    convert,
    plan_groups,
    verify,
)
from vllm_kimi_neuron.fp8 import FP8_DTYPE, NEURON_FP8_MAX, dequantize_blockwise
from vllm_kimi_neuron.layout import EXPERTS, LayoutError, ParallelLayout
from vllm_kimi_neuron.reference import Batch, Reference
from vllm_kimi_neuron.tiny import make_tiny, tiny_config
from vllm_kimi_neuron.weights import scale_name

CLI = [str(Path(sys.executable).parent / "kimi-neuron")]


@pytest.fixture(scope="module")
def neuron_flat(tiny_fp8: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(tiny_fp8, tmp_path_factory.mktemp("nf") / "out", "neuron-fp8", show_progress=False)


def _load_all(root: Path) -> dict[str, torch.Tensor]:
    index = CheckpointIndex.open(root)
    return index.load(sorted(index.weight_map))


def test_bf16_equals_blockwise_dequantisation(tiny_fp8: Path, tiny_bf16: Path) -> None:
    src, out = CheckpointIndex.open(tiny_fp8), CheckpointIndex.open(tiny_bf16)
    assert set(out.weight_map) == {n for n in src.weight_map if not n.endswith("_scale_inv")}
    assert "quantization_config" not in json.loads((tiny_bf16 / "config.json").read_text())
    name = "model.layers.2.mlp.experts.3.down_proj.weight"  # 256x128: two row blocks
    t = src.load([name, name + "_scale_inv"])
    q, scale = t[name], t[name + "_scale_inv"]
    expected = torch.cat([q[:128].float() * scale[0, 0], q[128:].float() * scale[1, 0]])
    assert torch.equal(out.load([name])[name], expected.to(torch.bfloat16))
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert out.load([bias])[bias].dtype == torch.float32
    for keep in (bias, "lm_head.weight"):
        assert torch.equal(out.load([keep])[keep], src.load([keep])[keep])
    assert (tiny_bf16 / "tokenizer.json").read_bytes() == (tiny_fp8 / "tokenizer.json").read_bytes()
    verify(tiny_bf16)


def test_neuron_fp8_experts_requantised_within_bound(tiny_fp8: Path, neuron_flat: Path) -> None:
    cfg = tiny_config()
    src, out = CheckpointIndex.open(tiny_fp8), _load_all(neuron_flat)
    p = f"layers.1.{EXPERTS}"
    gate_up, gu_scale = out[p + "gate_up_proj.weight"], out[p + "gate_up_proj.scale"]
    down, down_scale = out[p + "down_proj.weight"], out[p + "down_proj.scale"]
    e, h, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    assert gate_up.shape == (e, h, 2 * i) and gu_scale.shape == (e, 1, 2 * i)
    assert down.shape == (e, i, h) and down_scale.shape == (e, 1, h)
    assert gate_up.dtype == down.dtype == FP8_DTYPE and gu_scale.dtype == torch.float32
    for q in (gate_up, down):
        assert q.float().abs().max() <= NEURON_FP8_MAX
        assert not torch.any((q.view(torch.uint8) & 0x78) == 0x78), "exponent-15 encodings present"

    def source(expert: int, proj: str) -> torch.Tensor:
        name = f"model.layers.1.mlp.experts.{expert}.{proj}.weight"
        t = src.load([name, name + "_scale_inv"])
        return dequantize_blockwise(t[name], t[name + "_scale_inv"], dtype=torch.float32).T

    for expert in range(e):
        want = torch.cat([source(expert, "gate_proj"), source(expert, "up_proj")], dim=1)
        for q, s, w in ((gate_up[expert], gu_scale[expert], want),
                        (down[expert], down_scale[expert], source(expert, "down_proj"))):
            got = q.float() * s
            bound = torch.maximum(w.abs() * 2**-4, s * 2**-10) * (1 + 1e-6)
            assert torch.all((got - w).abs() <= bound)
            assert torch.allclose(s.squeeze(0), w.abs().amax(0) / NEURON_FP8_MAX)


def test_neuron_fp8_names_and_router_bias(neuron_flat: Path, tiny_fp8: Path) -> None:
    out = _load_all(neuron_flat)
    bias = out["layers.1.mlp.router.selection_bias"]
    assert bias.dtype == torch.float32
    src = CheckpointIndex.open(tiny_fp8).load(["model.layers.1.mlp.gate.e_score_correction_bias"])
    assert torch.equal(bias, src["model.layers.1.mlp.gate.e_score_correction_bias"])
    assert not any("bias" in n and "selection_bias" not in n for n in out)
    assert out["layers.0.mlp.gate_proj.weight"].dtype == torch.bfloat16  # dense layer stays BF16
    assert out["layers.1.mlp.shared_experts.down_proj.weight"].dtype == torch.bfloat16
    assert out["layers.1.self_attn.kv_b_proj.weight"].dtype == torch.bfloat16
    assert not any(n.startswith("model.") or "experts.0." in n for n in out)


def test_verify_catches_damage(tiny_fp8: Path, neuron_flat: Path, tmp_path: Path) -> None:
    broken = Path(shutil.copytree(neuron_flat, tmp_path / "b"))
    layer = broken / "neuron-layer-001.safetensors"
    data = bytearray(layer.read_bytes())
    data[-1] ^= 0xFF
    layer.write_bytes(bytes(data))
    (broken / "neuron-layer-002.safetensors").unlink()
    with pytest.raises(VerifyError) as err:
        verify(broken)
    text = str(err.value)
    assert "neuron-layer-001.safetensors: sha256 differs" in text
    assert "neuron-layer-002.safetensors: missing" in text
    (broken / MANIFEST).unlink()
    with pytest.raises(VerifyError, match="not a finished conversion"):
        verify(broken)


def test_out_dir_with_other_parameters_is_refused(tiny_fp8: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    (out / STATE).mkdir(parents=True)
    (out / STATE / "plan.json").write_text(json.dumps({"format": "bf16", "layout": None,
                                                       "source": {"path": "/elsewhere"}}))
    with pytest.raises(CheckpointError, match="other parameters"):
        convert(tiny_fp8, out, "neuron-fp8", show_progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_text("x")
    with pytest.raises(CheckpointError, match="not empty"):
        convert(tiny_fp8, tmp_path / "full", "bf16", show_progress=False)


def test_bad_layouts_are_explained() -> None:
    with pytest.raises(LayoutError, match="between 1 and 64"):
        ParallelLayout(tp=128, lnc=2)
    with pytest.raises(LayoutError, match="1 or 2"):
        ParallelLayout(tp=8, lnc=4)
    with pytest.raises(LayoutError, match="must divide"):
        ParallelLayout(tp=8, moe_ep=3)


def test_bad_checkpoints_are_named(tiny_fp8: Path, tiny_bf16: Path, tmp_path: Path) -> None:
    bad = Path(shutil.copytree(tiny_fp8, tmp_path / "m"))
    index = json.loads((bad / INDEX_NAME).read_text())
    del index["weight_map"]["model.layers.1.self_attn.o_proj.weight_scale_inv"]
    (bad / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"o_proj\.weight_scale_inv"):
        convert(bad, tmp_path / "o1", "neuron-fp8", show_progress=False)
    assert not (tmp_path / "o1" / MANIFEST).exists()
    with pytest.raises(CheckpointError, match="no quantization_config"):
        convert(tiny_bf16, tmp_path / "o2", "bf16", show_progress=False)
    nan = Path(shutil.copytree(tiny_fp8, tmp_path / "nan"))
    for i, name in enumerate(("model.layers.1.mlp.experts.3.up_proj.weight",
                              "model.layers.2.self_attn.o_proj.weight")):
        shard = nan / index["weight_map"][name]
        with shard.open("r+b") as f:  # one byte of the weight becomes e4m3fn's NaN
            f.seek(read_header(shard)[name].start + 5)
            f.write(b"\xff")
        named = re.escape(f"{shard}: {name!r}: NaN") + r" .* in rows 0\.\.\d+"
        for fmt in FORMATS:
            with pytest.raises(CheckpointError, match=named):
                convert(nan, tmp_path / f"o-{i}-{fmt}", fmt, show_progress=False)
            assert not (tmp_path / f"o-{i}-{fmt}" / MANIFEST).exists()
        shutil.copy(tiny_fp8 / index["weight_map"][name], shard)


def _deep_checkpoint(root: Path) -> Path:
    """A tiny model with enough layers that a conversion can be killed half-way."""
    import dataclasses

    return make_tiny(root, seed=5, config=dataclasses.replace(tiny_config(), num_hidden_layers=16,
                                                              n_routed_experts=32))


def test_sigkill_mid_run_then_resume(tmp_path: Path) -> None:
    src = _deep_checkpoint(tmp_path / "src")
    out = tmp_path / "out"
    args = [*CLI, "convert", "--model", str(src), "--out", str(out), "--format", "neuron-fp8"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = out / STATE / "done"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(done.glob("layer-*.json"))) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in done.glob("*.json")}
    assert 3 <= len(finished) < 17, "the kill did not land mid-run"
    assert not (out / MANIFEST).exists()
    with pytest.raises(VerifyError, match="not a finished conversion"):
        verify(out)
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"resumed: {len(finished)} groups already done" in r.stderr
    assert {n: (done / n).stat().st_mtime_ns for n in finished} == finished  # nothing redone
    verify(out)
    assert not list(out.rglob("*.partial"))


def test_progress_callback_counts_input_bytes_to_the_total(tiny_fp8: Path, tmp_path: Path) -> None:
    # What the Neuron start reports as its "converting" phase.
    calls: list[tuple[int, int]] = []
    convert(tiny_fp8, tmp_path / "o", "bf16", show_progress=False,
            on_progress=lambda d, t: calls.append((d, t)))
    index = CheckpointIndex.open(tiny_fp8)
    data_bytes = sum(e.stop - e.start for shard in index.shards
                     for e in read_header(tiny_fp8 / shard).values())
    assert calls[0] == (0, data_bytes)
    assert calls[-1] == (data_bytes, data_bytes)
    assert [d for d, _ in calls] == sorted({d for d, _ in calls})  # one call per group, growing
    assert len(calls) == len(plan_groups(index, KimiConfig.from_dir(tiny_fp8))) + 1


def test_disk_full_is_reported_and_resumable(tiny_fp8: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [*CLI, "convert", "--model", str(tiny_fp8), "--out", str(out), "--format", "bf16"]

    def small_disk() -> None:  # a file-size limit makes writes fail the way a full disk does
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 20, 8 << 20))

    r = subprocess.run(args, capture_output=True, text=True, timeout=300, preexec_fn=small_disk)
    assert r.returncode == 2, r.stderr
    assert "no space left" in r.stderr and "rerun the same command" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (out / MANIFEST).exists() and not list(out.rglob("*.partial"))
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    verify(out)


class _StoredAsBf16(Reference):
    """The reference on the FP8 checkpoint, with each dequantised FP8 weight rounded to bf16:
    exactly what the bf16 conversion stores."""

    def weight(self, name: str) -> torch.Tensor:
        t = super().weight(name)
        return t.bfloat16().float() if scale_name(name) in self.index.weight_map else t


def test_reference_gives_the_same_logits_from_bf16_output_as_from_fp8(
    tiny_fp8: Path, tiny_bf16: Path
) -> None:
    batch = Batch.of([[163584, 17, 3000, 42, 99, 100000, 5, 163601], [1, 2, 3]])

    def logits(ref: Reference) -> torch.Tensor:
        caches = [ref.new_cache(2, 8) for _ in range(ref.cfg.num_hidden_layers)]
        h, _ = ref.run(batch, caches, absorb=False)
        return ref.logits(h[batch.valid])

    from_bf16 = logits(Reference(tiny_bf16))
    # Bit for bit: the conversion adds nothing beyond rounding the dequantised weights to bf16.
    assert torch.equal(logits(_StoredAsBf16(tiny_fp8)), from_bf16)
    # That rounding (2**-9 relative per weight) barely moves the output: the same top-1 at every
    # position; logits differ by ~0.3% of their spread on average (measured 0.012 for a std of 4).
    from_fp8 = logits(Reference(tiny_fp8))
    diff = (from_fp8 - from_bf16).abs()
    assert torch.equal(from_fp8.argmax(-1), from_bf16.argmax(-1))
    assert diff.mean() < 0.01 * from_fp8.std() and diff.max() < 0.1 * from_fp8.std()


def test_verify_names_a_directory_pre_sharded_by_the_removed_option(neuron_flat: Path,
                                                                    tmp_path: Path) -> None:
    old = Path(shutil.copytree(neuron_flat, tmp_path / "old"))
    manifest = json.loads((old / MANIFEST).read_text())
    (old / MANIFEST).write_text(json.dumps({**manifest, "layout": {"tp": 2, "moe_ep": 1, "lnc": 2}}))
    with pytest.raises(VerifyError, match=r"pre-sharded for .* convert again"):
        verify(old)
