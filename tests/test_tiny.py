import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vllm_kimi_neuron.checkpoint import CheckpointIndex
from vllm_kimi_neuron.config import SPECIAL_TOKENS, KimiConfig
from vllm_kimi_neuron.fp8 import FP8_DTYPE
from vllm_kimi_neuron.tiny import make_tiny, tiny_config


def _digests(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}


def test_config_is_kimi_k2_format(tiny_fp8: Path) -> None:
    raw = json.loads((tiny_fp8 / "config.json").read_text())
    assert raw["model_type"] == "kimi_k2" and raw["architectures"] == ["DeepseekV3ForCausalLM"]
    assert raw["quantization_config"] == {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }
    assert raw["vocab_size"] == 163840 and raw["kv_lora_rank"] + raw["qk_rope_head_dim"] == 576
    assert (raw["scoring_func"], raw["topk_method"], raw["n_group"]) == ("sigmoid", "noaux_tc", 1)
    gen = json.loads((tiny_fp8 / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [163585, 163586]


def test_tensors_follow_the_real_checkpoint(tiny_fp8: Path) -> None:
    cfg = KimiConfig.from_dir(tiny_fp8)
    index = CheckpointIndex.open(tiny_fp8)
    assert len(index.shards) == 4
    names = set(index.weight_map)
    assert "model.layers.0.mlp.gate_proj.weight" in names  # layer 0 is dense
    assert "model.layers.0.mlp.gate.weight" not in names
    for layer in range(1, cfg.num_hidden_layers):
        p = f"model.layers.{layer}.mlp."
        assert {p + "gate.weight", p + "gate.e_score_correction_bias",
                p + "shared_experts.down_proj.weight"} <= names
        assert p + f"experts.{cfg.n_routed_experts - 1}.up_proj.weight_scale_inv" in names
    t = index.load(["model.layers.1.self_attn.kv_a_proj_with_mqa.weight",
                    "model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv",
                    "model.layers.1.mlp.gate.e_score_correction_bias",
                    "model.embed_tokens.weight", "model.layers.1.mlp.gate.weight"])
    assert t["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"].dtype == FP8_DTYPE
    assert t["model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (5, 2)  # 576x256
    assert t["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert t["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert t["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16  # the router is not FP8
    # every FP8 weight has its scale and vice versa
    fp8 = {n for n in names if n.endswith(".weight_scale_inv")}
    for n in fp8:
        with safe_open(str(tiny_fp8 / index.weight_map[n[: -len("_scale_inv")]]), "pt") as f:
            assert f.get_slice(n[: -len("_scale_inv")]).get_dtype() == "F8_E4M3"


def test_deterministic_per_seed(tmp_path: Path, tiny_fp8: Path) -> None:
    again = make_tiny(tmp_path / "again", seed=0)
    assert _digests(again) == _digests(tiny_fp8)
    other = make_tiny(tmp_path / "other", seed=1)
    differ = [n for n, d in _digests(other).items() if d != _digests(tiny_fp8)[n]]
    assert all(n.endswith(".safetensors") or n == "kimi_tiny.json" for n in differ) and differ


def test_presets() -> None:
    ds = tiny_config("deepseek-v3")
    assert (ds.n_group, ds.topk_group, ds.model_type) == (4, 2, "deepseek_v3")
    assert tiny_config("no-q-lora").q_lora_rank is None
    with pytest.raises(ValueError, match="unknown preset"):
        tiny_config("huge")


@pytest.fixture(scope="module")
def tok(tiny_fp8: Path):
    """The tokenizer exactly as vLLM loads it for serving (the hub is off: see conftest)."""
    from vllm.tokenizers import get_tokenizer

    return get_tokenizer(str(tiny_fp8))


def test_tokenizer_loads_offline_with_kimi_special_ids(tok) -> None:
    assert len(tok) == 163840
    for tid, (text, _) in SPECIAL_TOKENS.items():
        assert tok.convert_tokens_to_ids(text) == tid
        assert tok.encode(text, add_special_tokens=False) == [tid]
    assert tok.eos_token_id == 163585
    text = "The weather in Beijing is sunny. 12345 {\"city\": \"Beijing\"}"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text and len(ids) < len(text) / 2  # merges make real tokens
    # tool-call markers are not special: they survive skip_special_tokens, as in Kimi's tokenizer
    marker = tok.decode([163595, 163586], skip_special_tokens=True)
    assert marker == "<|tool_calls_section_begin|>"


def test_chat_template_renders_kimi_turns_and_tool_calls(tok) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    messages = [
        {"role": "user", "content": "Weather in Beijing?"},
        {"role": "assistant", "content": "", "tool_calls": [{
            "id": "functions.get_weather:0", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Beijing\"}"}}]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"},
    ]
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_system|>tool_declare<|im_middle|>" + json.dumps(tools) + "<|im_end|>"
        "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
        "<|im_user|>user<|im_middle|>Weather in Beijing?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><|tool_calls_section_begin|>"
        "<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
        "{\"city\": \"Beijing\"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>"
        "<|im_system|>tool<|im_middle|>## Return of functions.get_weather:0\nsunny<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>"
    )
    own_system = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False, add_generation_prompt=False)
    assert own_system == ("<|im_system|>system<|im_middle|>Be brief.<|im_end|>"
                          "<|im_user|>user<|im_middle|>Hi<|im_end|>")
