"""override_neuron_config: the key table against NxDI's manifest, Kimi's defaults, validation, merge."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from vllm_kimi_neuron.config import KimiConfig
from vllm_kimi_neuron.overrides import (
    KINDS,
    NESTED_KINDS,
    NEURON_CONFIG_KEYS,
    OverrideError,
    buckets,
    kimi_defaults,
    merge,
    validate_additional_config,
    validate_overrides,
)

MANIFESTS = Path(__file__).parent / "upstream_api"
NXDI = json.loads((MANIFESTS / "nxdi.json").read_text())["modules"]
NXD = json.loads((MANIFESTS / "nxd.json").read_text())["modules"]
CONFIG_CLASSES = NXDI["neuronx_distributed_inference.models.config"]["classes"]
KIMI = KimiConfig()


def _accepted(cls: str) -> dict[str, str | None]:
    """Keys a config class's __init__ reads, with their default's source text."""
    init = CONFIG_CLASSES[cls]["methods"]["__init__"]
    keys: dict[str, str | None] = dict(init.get("kwargs_keys", {}))
    keys.update({p["name"]: p["default"] for p in init["params"]
                 if p["kind"] == "positional" and p["name"] != "self"})
    return keys


def test_neuron_config_keys_are_what_nxdi_reads() -> None:
    manifest = {**_accepted("NeuronConfig"), **_accepted("MoENeuronConfig")}
    # logical_nc_config is popped inside NeuronConfig._get_lnc(kwargs), whose body the manifest omits.
    get_lnc = CONFIG_CLASSES["NeuronConfig"]["methods"]["_get_lnc"]
    assert [p["name"] for p in get_lnc["params"]] == ["self", "kwargs"]
    assert set(NEURON_CONFIG_KEYS) == set(manifest) | {"logical_nc_config"}


def test_value_kinds_agree_with_nxdi_defaults() -> None:
    manifest = {**_accepted("NeuronConfig"), **_accepted("MoENeuronConfig")}
    checked = 0
    for key, default in manifest.items():
        kind = KINDS[key].rstrip("?")
        if default in ("True", "False"):
            assert kind == "bool", key
        elif default is not None and re.fullmatch(r"-?\d+", default):
            assert kind == "int", key
        elif default is not None and re.fullmatch(r"-?\d+\.\d*", default):
            assert kind == "float", key
        elif default is not None and default[0] in "'\"":
            assert kind == "str", key
        elif default == "None":
            assert KINDS[key].endswith("?") or kind == "any", key
        else:
            continue
        checked += 1
    assert checked >= 140  # the parser saw the literal defaults it is meant to check


def test_nested_keys_are_what_nxd_and_nxdi_read() -> None:
    moe_configs = NXD["neuronx_distributed.modules.moe.moe_configs"]["classes"]
    blockwise = moe_configs["BlockwiseMatmulConfig"]["methods"]["from_kwargs"]["kwargs_keys"]
    assert set(NESTED_KINDS["blockwise_matmul_config"]) == set(blockwise)
    assert "router_config" not in NESTED_KINDS  # refused as a key that does nothing for this model
    sampling = CONFIG_CLASSES["OnDeviceSamplingConfig"]["methods"]["__init__"]["kwargs_keys"]
    assert set(NESTED_KINDS["on_device_sampling_config"]) == set(sampling)


def test_buckets() -> None:
    assert buckets(2048) == [128, 256, 512, 1024, 2048]
    assert buckets(1000) == [128, 256, 512, 1000]
    assert buckets(128) == [128]
    assert buckets(100) == [100]


def defaults(seqs: int = 8, length: int = 4096, **kw: Any) -> dict[str, Any]:
    return kimi_defaults(KIMI, tp_degree=64, max_num_seqs=seqs, max_model_len=length, **kw)


def test_kimi_defaults() -> None:
    d = defaults(seqs=16, length=3000)
    assert set(d) <= NEURON_CONFIG_KEYS
    assert validate_overrides(d) == d  # the defaults are themselves valid overrides
    assert d["batch_size"] == d["tkg_batch_size"] == d["max_batch_size"] == 16
    assert d["ctx_batch_size"] == 1 and d["is_continuous_batching"] is True
    assert d["seq_len"] == d["max_context_length"] == 3000
    assert d["enable_bucketing"] is True
    assert d["context_encoding_buckets"] == d["token_generation_buckets"] == [128, 256, 512, 1024, 2048, 3000]
    assert (d["logical_nc_config"], d["on_device_sampling_config"]) == (2, None)
    assert (d["is_prefix_caching"], d["is_block_kv_layout"]) == (False, False)
    assert "capacity_factor" not in d and "router_config" not in d  # NxDI never uses them for this model
    assert (d["quantized"], d["quantization_type"], d["quantization_dtype"]) == (
        True, "expert_wise_per_channel_symmetric", "f8e4m3")
    assert d["blockwise_matmul_config"] == {"use_shard_on_block_dynamic_while": True,
                                            "block_sharding_strategy": "PING_PONG", "logical_nc_config": 2}
    assert d["disable_normalize_top_k_affinities"] is True and d["save_sharded_checkpoint"] is True
    assert (d["tp_degree"], d["ep_degree"], d["moe_tp_degree"], d["moe_ep_degree"]) == (64, 1, 64, 1)
    assert defaults(seqs=1)["is_continuous_batching"] is True
    assert defaults(max_context_length=1024)["context_encoding_buckets"] == [128, 256, 512, 1024]
    whole_model_ep = kimi_defaults(KIMI, tp_degree=32, ep_degree=2, moe_ep_degree=2, max_num_seqs=8,
                                   max_model_len=1024)
    assert (whole_model_ep["moe_tp_degree"], whole_model_ep["moe_ep_degree"]) == (32, 2)


def test_modules_to_not_convert_keep_exactly_the_dense_layers_out_of_fp8() -> None:
    """NxD matches these entries as substrings of module paths (quantize.py), so check them that way
    for a model with three dense layers, where a bare "layers.1" would also catch layers 10-19."""
    cfg = KimiConfig(num_hidden_layers=25, first_k_dense_replace=3)
    keep = kimi_defaults(cfg, tp_degree=8, max_num_seqs=1, max_model_len=256)["modules_to_not_convert"]

    def converted(path: str) -> bool:
        return not any(entry in path for entry in keep)

    for layer in range(cfg.num_hidden_layers):
        if cfg.is_moe_layer(layer):
            assert converted(f"layers.{layer}.mlp.expert_mlps.mlp_op.gate_up_proj"), layer
            assert not converted(f"layers.{layer}.mlp.shared_experts.gate_proj")
            assert not converted(f"layers.{layer}.mlp.router.linear_router")
        else:
            assert not converted(f"layers.{layer}.mlp.gate_proj"), layer
        assert not converted(f"layers.{layer}.self_attn.q_b_proj")
    assert not converted("lm_head") and not converted("embed_tokens")


def problems_of(exc: pytest.ExceptionInfo[OverrideError]) -> str:
    return str(exc.value)


def test_unknown_keys_get_the_closest_valid_key() -> None:
    with pytest.raises(OverrideError) as exc:
        validate_overrides({"tkg_batch": 8})
    assert "tkg_batch: unknown key (did you mean tkg_batch_size?)" in problems_of(exc)
    with pytest.raises(OverrideError) as exc:
        validate_overrides({"zzzz": 1})
    assert "zzzz: unknown key (see NxDI's NeuronConfig/MoENeuronConfig)" in problems_of(exc)


def test_hyphenated_keys_are_explained() -> None:
    with pytest.raises(OverrideError) as exc:
        validate_overrides({"logical-nc-config": 2})
    assert "logical-nc-config: use underscores: logical_nc_config" in problems_of(exc)
    with pytest.raises(OverrideError) as exc:
        validate_overrides({"blockwise_matmul_config": {"block-size": 256}})
    assert "blockwise_matmul_config.block-size: use underscores: blockwise_matmul_config.block_size" in \
        problems_of(exc)


def test_keys_the_plugin_manages_say_what_to_use() -> None:
    with pytest.raises(OverrideError) as exc:
        validate_overrides({"quantized_checkpoints_path": "/x"})
    assert "KIMI_NEURON_CHECKPOINT" in problems_of(exc)
    with pytest.raises(OverrideError) as exc:
        validate_overrides({"logical_neuron_cores": 2})
    assert "use logical_nc_config" in problems_of(exc)


@pytest.mark.parametrize(("user", "expected"), [
    ({"tkg_batch_size": "8"}, "tkg_batch_size must be an integer, got '8' (str)"),
    ({"enable_bucketing": 1}, "enable_bucketing must be true or false, got 1 (int)"),
    ({"batch_size": True}, "batch_size must be an integer, got True (bool)"),
    ({"context_encoding_buckets": [128, "256"]},
     "context_encoding_buckets must be a list of integers or null"),
    ({"on_device_sampling_config": [1]}, "on_device_sampling_config must be a JSON object or null"),
    ({"capacity_factor": 2.0}, "capacity_factor: it has no effect: NxDI 0.9's MoE builder"),
    ({"router_config": {"act_fn": "sigmoid"}},
     "router_config: it has no effect: it configures NxD's RouterTopK"),
    ({"modules_to_not_convert": "lm_head"}, "modules_to_not_convert must be a list of strings or null"),
    ({"blockwise_matmul_config": {"block_size": "512"}},
     "blockwise_matmul_config.block_size must be an integer"),
    ({"blockwise_matmul_config": {"use_shard_on_block": True}},
     "blockwise_matmul_config.use_shard_on_block: unknown key (did you mean "
     "blockwise_matmul_config.use_shard_on_block_dynamic_while?)"),
    ({"on_device_sampling_config": {"global_top_k": 64}},
     "on_device_sampling_config.global_top_k: unknown key "
     "(did you mean on_device_sampling_config.global_topk?)"),
])
def test_wrong_types_are_refused(user: dict[str, Any], expected: str) -> None:
    with pytest.raises(OverrideError) as exc:
        validate_overrides(user)
    assert expected in problems_of(exc)


def test_every_problem_is_reported_at_once_and_good_input_is_copied() -> None:
    with pytest.raises(OverrideError) as exc:
        validate_overrides({"tkg_batch": 8, "logical-nc-config": 2, "seq_len": "x"})
    assert problems_of(exc).startswith("override_neuron_config: 3 problems:")
    given = {"blockwise_matmul_config": {"block_size": 256}, "skip_warmup": True}
    out = validate_overrides(given)
    assert out == given
    out["blockwise_matmul_config"]["block_size"] = 1024
    assert given["blockwise_matmul_config"]["block_size"] == 256
    with pytest.raises(OverrideError, match="must be a JSON object"):
        validate_overrides([("seq_len", 1)])  # type: ignore[arg-type]


def test_additional_config() -> None:
    assert validate_additional_config({}) == {}
    assert validate_additional_config({"override_neuron_config": None}) == {}
    given = {"override_neuron_config": {"skip_warmup": True}}
    assert validate_additional_config(given) == {"skip_warmup": True}
    with pytest.raises(OverrideError) as exc:
        validate_additional_config({"override-neuron-config": {"skip_warmup": True}})
    assert "'override-neuron-config': use underscores: override_neuron_config" in problems_of(exc)
    assert "silently ignores" in problems_of(exc)
    with pytest.raises(OverrideError, match="use underscores: max_prompt_length"):
        validate_additional_config({"max-prompt-length": 100})
    with pytest.raises(OverrideError, match="override_neuron_config must be a JSON object, got str"):
        validate_additional_config({"override_neuron_config": '{"skip_warmup": true}'})
    with pytest.raises(OverrideError, match="tkg_batch_size"):
        validate_additional_config({"override_neuron_config": {"tkg_batch": 1}})
    # vllm-neuron forces max_context_length to max_prompt_length: carried over so the plan agrees
    assert validate_additional_config({"max_prompt_length": 1000}) == {"max_context_length": 1000}
    with pytest.raises(OverrideError, match="refuses the two to differ"):
        validate_additional_config({"max_prompt_length": 1000,
                                    "override_neuron_config": {"max_context_length": 2000}})


def test_merge_user_wins() -> None:
    d = defaults()
    merged, warnings = merge(d, {"save_sharded_checkpoint": False, "skip_warmup": True,
                                 "blockwise_matmul_config": {"block_size": 256}}, KIMI)
    assert merged["save_sharded_checkpoint"] is False and merged["skip_warmup"] is True
    # nested kernel settings merge key by key: the kernel choice survives a block-size change
    assert merged["blockwise_matmul_config"] == {**d["blockwise_matmul_config"], "block_size": 256}
    assert warnings == []
    assert {k: v for k, v in merged.items() if k not in ("save_sharded_checkpoint", "skip_warmup",
                                                        "blockwise_matmul_config")} == \
        {k: v for k, v in d.items() if k not in ("save_sharded_checkpoint", "blockwise_matmul_config")}
    assert d["save_sharded_checkpoint"] is True  # defaults untouched


def test_merge_keeps_all_four_quantization_keys() -> None:
    """vllm-neuron re-adds per_tensor/int8 for missing quantization keys when "quantized" is in the
    override; the merged override always carries them all."""
    merged, _ = merge(defaults(), {"quantized": True}, KIMI)
    assert (merged["quantized"], merged["quantization_type"], merged["quantization_dtype"]) == (
        True, "expert_wise_per_channel_symmetric", "f8e4m3")


def test_on_device_sampling_is_allowed_with_a_warning() -> None:
    merged, warnings = merge(defaults(), {"on_device_sampling_config": {"global_topk": 64}}, KIMI)
    assert merged["on_device_sampling_config"] == {"global_topk": 64}
    assert len(warnings) == 1 and "no logprobs" in warnings[0] and "top-64" in warnings[0]


def test_non_continuous_batching_is_allowed_only_for_one_sequence() -> None:
    _, warnings = merge(defaults(seqs=1), {"is_continuous_batching": False}, KIMI)
    assert "is_continuous_batching=false" in warnings[0]
    with pytest.raises(OverrideError, match="is_continuous_batching=false with max_num_seqs 8"):
        merge(defaults(seqs=8), {"is_continuous_batching": False}, KIMI)


@pytest.mark.parametrize(("user", "expected"), [
    ({"tkg_batch_size": 4}, "tkg_batch_size=4 but max_num_seqs is 8"),
    ({"batch_size": 4, "max_batch_size": 4}, "set --max-num-seqs 4 instead"),
    ({"kv_cache_batch_size": 16}, "kv_cache_batch_size=16 but max_num_seqs is 8"),
    ({"ctx_batch_size": 2}, "ctx_batch_size=2 with continuous batching"),
    ({"tp_degree": 32}, "set --tensor-parallel-size 32 instead"),
    ({"moe_tp_degree": 32}, "moe_tp_degree*moe_ep_degree = 32*1 = 32 must equal tp_degree*ep_degree = 64"),
    ({"ep_degree": 2}, "= 64 must equal tp_degree*ep_degree = 128"),
    ({"ep_degree": 2, "moe_tp_degree": 32, "moe_ep_degree": 4},
     "only moe_tp_degree = tp_degree and moe_ep_degree = ep_degree is shown correct"),
    ({"world_size": 32}, "world_size=32 but tp_degree*ep_degree is 64"),
    ({"logical_nc_config": 3}, "logical_nc_config=3: a trn2 logical NeuronCore is 1 or 2"),
    ({"logical_nc_config": 1}, "blockwise_matmul_config.logical_nc_config=2 but logical_nc_config is 1"),
    ({"quantization_type": "per_tensor_symmetric"}, "the served weights are the neuron-fp8 conversion"),
    ({"quantized": False}, "the served weights are the neuron-fp8 conversion"),
    ({"quantization_dtype": "int8"}, "{'quantization_dtype': 'int8'}"),
    ({"torch_dtype": "float64"}, "torch_dtype='float64'"),
    ({"seq_len": 8192}, "set --max-model-len 8192 instead"),
    ({"max_context_length": 9000}, "max_context_length=9000 must be between 1 and max_model_len 4096"),
    ({"context_encoding_buckets": [128, 1024]}, "must be increasing positive lengths ending at 4096"),
    ({"token_generation_buckets": [4096, 128]}, "token_generation_buckets=[4096, 128]"),
    ({"glu_mlp": False}, "glu_mlp=false"),
    ({"disable_normalize_top_k_affinities": False}, "normalising again would undo the scaling"),
    ({"hybrid_sharding_config": {"moe_cte_tp_degree": 64}}, "second copy of every expert weight"),
    ({"is_prefix_caching": True}, "--no-enable-prefix-caching"),
    ({"blockwise_matmul_config": {"use_shard_on_block_dynamic_while": False}}, "which SDK 2.29 removed"),
    ({"blockwise_matmul_config": {"use_shard_on_intermediate_dynamic_while": True}}, "choose one"),
    ({"blockwise_matmul_config": {"block_size": 300}}, "block_size=300"),
    ({"blockwise_matmul_config": {"block_sharding_strategy": "ROUND"}}, "'HI_LO' or 'PING_PONG'"),
])
def test_impossible_combinations_are_refused(user: dict[str, Any], expected: str) -> None:
    with pytest.raises(OverrideError) as exc:
        merge(defaults(seqs=8, length=4096), validate_overrides(user), KIMI)
    assert expected in problems_of(exc)


def test_torch_block_wise_is_an_allowed_kernel_choice() -> None:
    merged, _ = merge(defaults(), {"blockwise_matmul_config": {"use_shard_on_block_dynamic_while": False,
                                                               "use_torch_block_wise": True}}, KIMI)
    assert merged["blockwise_matmul_config"]["use_torch_block_wise"] is True
