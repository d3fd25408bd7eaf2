import json
from pathlib import Path

import pytest

from vllm_kimi_neuron.config import IM_END_ID, ConfigError, KimiConfig, stop_token_ids


def test_defaults_are_kimi_k2_0905() -> None:
    cfg = KimiConfig()
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.n_routed_experts) == (61, 7168, 384)
    assert cfg.kv_cache_width == 576 and cfg.qk_head_dim == 192
    assert cfg.rope_scaling is not None and cfg.rope_scaling.factor == 64.0
    assert not cfg.is_moe_layer(0) and cfg.is_moe_layer(1)


def test_round_trip_through_config_json() -> None:
    cfg = KimiConfig(hidden_size=256, q_lora_rank=None, n_group=4, topk_group=2, n_routed_experts=16)
    raw = json.loads(json.dumps(cfg.to_dict()))
    assert raw["quantization_config"]["weight_block_size"] == [128, 128]
    assert raw["architectures"] == ["DeepseekV3ForCausalLM"] and raw["topk_method"] == "noaux_tc"
    assert KimiConfig.from_dict(raw) == cfg


def test_rejects_other_architectures() -> None:
    raw = KimiConfig().to_dict() | {"architectures": ["LlamaForCausalLM"]}
    with pytest.raises(ConfigError, match="DeepseekV3ForCausalLM"):
        KimiConfig.from_dict(raw, source="x/config.json")


def test_rejects_softmax_routing_and_bad_groups() -> None:
    with pytest.raises(ConfigError, match="sigmoid"):
        KimiConfig.from_dict(KimiConfig().to_dict() | {"scoring_func": "softmax"})
    with pytest.raises(ConfigError, match="topk_group"):
        KimiConfig(n_group=2, topk_group=3)
    with pytest.raises(ConfigError, match="divisible"):
        KimiConfig(n_routed_experts=10, n_group=4, topk_group=1)


def test_from_dir_names_the_missing_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"config\.json not found"):
        KimiConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        KimiConfig.from_dir(tmp_path)


def test_stop_tokens_include_im_end(tmp_path) -> None:
    cfg = KimiConfig()
    assert stop_token_ids(tmp_path, cfg) == [163585, IM_END_ID]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert stop_token_ids(tmp_path, cfg) == [7, 163585, IM_END_ID]
    ds = KimiConfig(model_type="deepseek_v3", eos_token_id=1)
    assert stop_token_ids(tmp_path, ds) == [1, 7]


def test_resolve_model_local_dir_and_clear_errors(tiny_fp8: Path, tmp_path: Path) -> None:
    from vllm_kimi_neuron.config import resolve_model

    assert resolve_model(str(tiny_fp8)) == tiny_fp8
    with pytest.raises(ConfigError, match=r"has no config\.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ConfigError, match=r"huggingface-cli download moonshotai/Kimi-K2-Instruct-0905"):
        resolve_model("moonshotai/Kimi-K2-Instruct-0905")  # HF_HUB_OFFLINE (conftest), not cached
    with pytest.raises(ConfigError, match="neither a model directory nor a Hugging Face id"):
        resolve_model("/no/such/dir")


def test_resolve_model_finds_a_snapshot_in_the_hub_cache(
    tiny_fp8: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from vllm_kimi_neuron.config import resolve_model
    from vllm_kimi_neuron.convert import converted_dir

    repo = tmp_path / "hub" / "models--moonshotai--Kimi-K2-Instruct-0905"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_fp8, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    found = resolve_model("moonshotai/Kimi-K2-Instruct-0905")
    assert found == repo / "snapshots" / commit
    monkeypatch.setenv("KIMI_NEURON_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KIMI_NEURON_CHECKPOINT", raising=False)
    assert converted_dir(found) == tmp_path / "home" / "converted" / (
        "moonshotai--Kimi-K2-Instruct-0905-0123456789ab-neuron-fp8")
