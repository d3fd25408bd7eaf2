"""The layer-streaming reference against transformers' DeepseekV3ForCausalLM, against itself in
its two MLA forms and batch layouts, and on broken checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from vllm_kimi_neuron import weights as names
from vllm_kimi_neuron.checkpoint import INDEX_NAME, CheckpointError, CheckpointIndex
from vllm_kimi_neuron.config import KimiConfig, RopeScaling
from vllm_kimi_neuron.reference import Batch, Reference
from vllm_kimi_neuron.tiny import write_checkpoint

# Small enough to build and run in well under a second; the vocabulary-sized paths are covered
# by the golden tests on the real-vocabulary tiny checkpoint. A short original window makes
# YaRN's interpolated pairs turn measurably within a dozen positions.
_SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
              num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, kv_lora_rank=32,
              qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16)
CONFIGS = {
    # Kimi-K2 routing (one group) and YaRN (beta 1/1), with and without query compression.
    "kimi": KimiConfig(**_SMALL, q_lora_rank=48, n_routed_experts=8, num_experts_per_tok=2,
                       routed_scaling_factor=2.827,
                       rope_scaling=RopeScaling(factor=64, original_max_position_embeddings=64)),
    "kimi-no-q-lora": KimiConfig(**_SMALL, q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=2,
                                 rope_scaling=RopeScaling(factor=32, original_max_position_embeddings=64)),
    # DeepSeek-V3 group-limited routing and YaRN (beta 32/1), two dense layers.
    "deepseek-v3": KimiConfig(**{**_SMALL, "first_k_dense_replace": 2, "num_hidden_layers": 4},
                              q_lora_rank=48, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                              topk_group=2, routed_scaling_factor=2.5, model_type="deepseek_v3",
                              rope_scaling=RopeScaling(factor=40, original_max_position_embeddings=64,
                                                       beta_fast=32, beta_slow=1)),
    # Unquantised (BF16) weights, and an mscale != mscale_all_dim so cos/sin are scaled too.
    "deepseek-v3-no-q-lora-bf16": KimiConfig(
        **_SMALL, q_lora_rank=None, n_routed_experts=16, num_experts_per_tok=3, n_group=8, topk_group=3,
        model_type="deepseek_v3", quantization=None,
        rope_scaling=RopeScaling(factor=16, original_max_position_embeddings=32, beta_fast=32, beta_slow=1,
                                 mscale=1.0, mscale_all_dim=0.8)),
}
PROMPTS = [[1, 5, 7, 9, 11, 200, 300, 4, 5, 6, 17, 400], [3, 4, 5], [100, 101, 102, 103, 104, 105, 90]]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("small")
    return {name: write_checkpoint(root / name, cfg, seed=i) for i, (name, cfg) in enumerate(CONFIGS.items())}


def _transformers_model(ref: Reference) -> DeepseekV3ForCausalLM:
    """transformers' model with the reference's own (dequantised, fp32) weights.

    transformers 5 keeps the routed experts fused (``gate_up_proj [E, 2I, H]`` gate rows first,
    ``down_proj [E, H, I]``); the checkpoint has one tensor per expert and projection.
    """
    raw = ref.cfg.to_dict()
    raw.pop("model_type")
    raw.pop("quantization_config", None)
    hf_config = DeepseekV3Config(**raw)
    hf_config._attn_implementation = "eager"
    model = DeepseekV3ForCausalLM(hf_config).eval()
    state = {n: ref.weight(n) for n in names.tensor_shapes(ref.cfg)}
    for layer in range(ref.cfg.num_hidden_layers):
        if ref.cfg.is_moe_layer(layer):
            p = f"{names.layer_prefix(layer)}mlp.experts."
            experts = [names.mlp_weights(state.pop, f"{p}{e}.") for e in range(ref.cfg.n_routed_experts)]
            state[p + "gate_up_proj"] = torch.stack([torch.cat((e.gate_proj, e.up_proj)) for e in experts])
            state[p + "down_proj"] = torch.stack([e.down_proj for e in experts])
    model.load_state_dict(state, strict=True)
    return model


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _prefill(ref: Reference, prompts: list[list[int]], slots: int, absorb: bool = False
             ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    caches = [ref.new_cache(len(prompts), slots) for _ in range(ref.cfg.num_hidden_layers)]
    h, caches = ref.run(Batch.of(prompts), caches, absorb=absorb)
    return ref.logits(h), caches


def _decode(ref: Reference, tokens: list[int], positions: list[int], caches: list[torch.Tensor]
            ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    h, caches = ref.run(Batch.of([[t] for t in tokens]), caches, absorb=True,
                        positions=torch.tensor(positions).unsqueeze(1))
    return ref.logits(h)[:, 0], caches


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_equal_transformers(name: str, checkpoints: dict[str, Path]) -> None:
    ref = Reference(checkpoints[name])
    model = _transformers_model(ref)
    ours, _ = _prefill(ref, PROMPTS, max(map(len, PROMPTS)))  # one right-padded batch
    for b, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            expected = model(torch.tensor([prompt])).logits[0]
        assert _rel_err(ours[b, : len(prompt)], expected) < 1e-4, name


def test_absorbed_decode_step_by_step_equals_decompressed_prefill(checkpoints: dict[str, Path]) -> None:
    ref = Reference(checkpoints["kimi"])
    seq = PROMPTS[0]
    full, _ = _prefill(ref, [seq], len(seq))
    start = 3
    logits, caches = _prefill(ref, [seq[:start]], len(seq))
    assert _rel_err(logits[0], full[0, :start]) < 1e-4
    for t in range(start, len(seq)):
        step, caches = _decode(ref, [seq[t]], [t], caches)
        assert _rel_err(step[0], full[0, t]) < 1e-4, t
    absorbed_prefill, _ = _prefill(ref, [seq], len(seq), absorb=True)  # same maths, either form
    assert _rel_err(absorbed_prefill, full) < 1e-4


def test_batched_decode_at_different_positions_equals_each_sequence_alone(
    checkpoints: dict[str, Path],
) -> None:
    ref = Reference(checkpoints["deepseek-v3"])
    new = [[7, 8, 9], [300, 301, 302], [50, 51, 52]]
    slots = max(map(len, PROMPTS)) + 3
    _, caches = _prefill(ref, PROMPTS, slots)
    batched = []
    for j in range(3):
        step, caches = _decode(ref, [n[j] for n in new], [len(p) + j for p in PROMPTS], caches)
        batched.append(step)
    for b, prompt in enumerate(PROMPTS):
        _, alone_caches = _prefill(ref, [prompt], len(prompt) + 3)
        for j in range(3):
            alone, alone_caches = _decode(ref, [new[b][j]], [len(prompt) + j], alone_caches)
            assert _rel_err(batched[j][b], alone[0]) < 1e-4, (b, j)


def test_only_routed_experts_are_read(checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    ref = Reference(checkpoints["deepseek-v3"])
    read: list[str] = []
    original = CheckpointIndex.read

    def spy(index: CheckpointIndex, name: str, *args: int) -> torch.Tensor:
        read.append(name)
        return original(index, name, *args)

    monkeypatch.setattr(CheckpointIndex, "read", spy)
    _decode(ref, [5], [0], [ref.new_cache(1, 1) for _ in range(4)])  # one token: top-4 of 16 per layer
    for layer in (2, 3):
        experts = {n.split(".")[5] for n in read if n.startswith(f"model.layers.{layer}.mlp.experts.")}
        assert len(experts) == 4
    assert read.count(names.LM_HEAD) == 1 and names.EMBED not in read  # embedding rows are gathered


# -- broken checkpoints: the error names the file and the tensor --------------------------------
@pytest.fixture
def broken(checkpoints: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(checkpoints["kimi"], tmp_path / "broken"))


def _rewrite_tensor(root: Path, name: str, tensor: torch.Tensor | None) -> str:
    index = json.loads((root / INDEX_NAME).read_text())
    shard = index["weight_map"][name]
    tensors = load_file(str(root / shard))
    if tensor is None:
        del tensors[name]
    else:
        tensors[name] = tensor
    save_file(tensors, str(root / shard))
    return shard


def test_missing_shard_is_named(broken: Path) -> None:
    shard = json.loads((broken / INDEX_NAME).read_text())["weight_map"]["lm_head.weight"]
    (broken / shard).unlink()
    with pytest.raises(CheckpointError, match=shard.replace(".", r"\.")):
        Reference(broken)


def test_index_pointing_at_a_missing_tensor_is_named(broken: Path) -> None:
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    shard = _rewrite_tensor(broken, name, None)
    with pytest.raises(CheckpointError, match=rf"{shard}.*{name}.*no such tensor"):
        Reference(broken)


def test_tensor_missing_from_index_is_named(broken: Path) -> None:
    index = json.loads((broken / INDEX_NAME).read_text())
    del index["weight_map"]["model.layers.1.self_attn.kv_a_layernorm.weight"]
    (broken / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"index\.json: no tensor named 'model\.layers\.1\.self_attn"):
        Reference(broken)


def test_wrong_shape_is_named(broken: Path) -> None:
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    shard = _rewrite_tensor(broken, name, torch.zeros(96, 32, dtype=torch.float8_e4m3fn))
    expected = rf"{shard}: tensor '{name}' has shape \[96, 32\] but .* \[128, 32\]"
    with pytest.raises(CheckpointError, match=expected):
        Reference(broken)


def test_wrong_dtype_is_named(broken: Path) -> None:
    name = "model.layers.0.post_attention_layernorm.weight"
    shard = _rewrite_tensor(broken, name, torch.zeros(64, dtype=torch.int32))
    with pytest.raises(CheckpointError, match=rf"{shard}: tensor '{name}' has dtype I32"):
        Reference(broken)
    scale = "model.layers.1.mlp.experts.0.down_proj.weight_scale_inv"
    shard = _rewrite_tensor(broken, name, torch.ones(64, dtype=torch.bfloat16))  # repair the first
    shard = _rewrite_tensor(broken, scale, torch.ones(1, 1, dtype=torch.bfloat16))
    with pytest.raises(CheckpointError, match=rf"{shard}: tensor '{scale}' is BF16 \[1, 1\]; .* needs F32"):
        Reference(broken)


def test_truncated_shard_is_named(broken: Path) -> None:
    shard = json.loads((broken / INDEX_NAME).read_text())["weight_map"]["lm_head.weight"]
    data = (broken / shard).read_bytes()
    (broken / shard).write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=rf"{shard}: tensor '.*' .*truncated"):
        Reference(broken)
