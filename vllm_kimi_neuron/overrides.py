"""``override_neuron_config``: the one owner of NxDI NeuronConfig keys, Kimi's defaults, validation
of what a user passes, and the merge of the two.

vllm-neuron dict-merges ``--additional-config '{"override_neuron_config": {...}}'`` over its own
defaults and NxDI only *warns* about keys it does not know, so a typo, a hyphenated key or a
half-given setting is silently ignored and shows up, if at all, as a wrong compile an hour later.
Here every key is checked against the keys NxDI 0.9 reads, every value against its type, and
combinations that cannot work are refused before anything compiles, each with what to do instead.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping
from typing import Any

from .config import KimiConfig


class OverrideError(ValueError):
    """An ``override_neuron_config`` (or ``--additional-config``) that cannot be used as given."""


# The keys NxDI 0.9 reads from ``NeuronConfig(**kwargs)`` and ``MoENeuronConfig(**kwargs)``, by the
# JSON type a value must have ("?" = null allowed, "ints" = list of integers). Source: the
# ``kwargs.pop`` keys of both ``__init__``s and MoENeuronConfig's two named parameters
# (tests/upstream_api/nxdi.json; tests/test_overrides.py checks this table against it), plus
# ``logical_nc_config``, which NeuronConfig reads in ``_get_lnc(kwargs)``.
_KEYS_BY_KIND = {
    "bool": """
        allow_input_truncation on_cpu output_logits vocab_parallel enable_cte_modular_flow
        layer_boundary_markers fused_qkv sequence_parallel_enabled is_continuous_batching
        disable_argmax_kernel async_mode enable_bucketing bucket_n_active_tokens quantized
        is_mxfp4_compute is_full_model_shuffled kv_cache_quant enable_fused_speculation
        enable_eagle_speculation eagle_rolling_buffer_kernel_enabled is_eagle3 is_eagle_draft
        enable_eagle_draft_input_norm is_medusa is_block_kv_layout is_prefix_caching
        save_sharded_checkpoint skip_sharding enable_ve_data_parallel qk_layernorm pre_rope_rmsnorm
        flash_decoding_enabled disable_kv_cache_tiling k_cache_transposed
        strided_context_parallel_kernel_enabled qkv_kernel_enabled qkv_nki_kernel_enabled
        qkv_cte_nki_kernel_fuse_rope qkv_kernel_nbsd_layout mlp_kernel_enabled
        mlp_tkg_nki_kernel_enabled fused_rmsnorm_skip_gamma mlp_kernel_fuse_residual_add
        qkv_kernel_fuse_residual_add quantized_mlp_kernel_enabled out_proj_kernel_enabled
        attn_tkg_nki_kernel_enabled attn_tkg_builtin_kernel_enabled attn_block_tkg_nki_kernel_enabled
        attn_block_tkg_nki_kernel_cache_update attn_block_tkg_nki_kernel_cascaded_attention
        attn_block_tkg_nki_kernel_use_online_softmax attn_block_tkg_nki_kernel_disable_gpsimd_sb2sb
        attn_block_cte_nki_kernel_enabled rmsnorm_quantize_kernel_enabled enable_spill_reload_dge
        apply_seq_ids_mask skip_warmup enable_output_completion_notifications
        disable_numeric_cc_token switch_cc overrides_torch_dtype lm_head_pad use_index_calc_kernel
        moe_mask_padded_tokens early_expert_affinity_modulation fused_shared_experts
        shared_experts_sequence_parallel_enabled return_expert_index return_router_logits
        transpose_shared_experts_weights disable_normalize_top_k_affinities glu_mlp
    """,
    "bool?": """
        attn_kernel_enabled moe_fused_nki_kernel_enabled router_topk_nki_kernel_enabled
        expert_mlp_nki_kernel_enabled shared_mlp_nki_kernel_enabled
    """,
    "int": """
        batch_size seq_len weight_gather_seq_len_threshold kv_cache_padding_size speculation_length
        medusa_speculation_length num_medusa_heads tp_degree cp_degree mlp_cp_degree
        attention_dp_degree pp_degree ep_degree start_rank_id lm_head_pad_alignment_size
        cc_pipeline_tiling_factor seq_len_threshold_for_cc_tiling moe_tp_degree moe_ep_degree
        n_active_tokens n_positions max_context_length max_length pa_block_size max_new_tokens
        ctx_batch_size tkg_batch_size max_batch_size kv_cache_batch_size spec_batch_size
        pa_num_blocks scratchpad_page_size logical_nc_config
    """,
    "int?": """
        windowed_context_encoding_size world_size local_ranks_size padded_hidden_size
        padded_intermediate_size
    """,
    "float": "hidden_act_scaling_factor hidden_act_bias quantize_clamp_bound",
    "float?": """
        capacity_factor gate_clamp_upper_limit gate_clamp_lower_limit up_clamp_upper_limit
        up_clamp_lower_limit
    """,
    "str": """
        padding_side cast_type attn_cls quantization_type quantization_dtype quantization_scale_dtype
        ep_dispatch_cc_option glu_type torch_dtype
    """,
    "str?": "rpl_reduce_dtype attention_dtype quantized_checkpoints_path activation_quantization_type target",
    "ints": "buckets",
    "ints?": """
        context_encoding_buckets prefix_buckets token_generation_buckets token_generation_batches
        quantization_block_size quantization_block_axis
    """,
    "strs": "weights_to_skip_layout_optimization",
    "strs?": "modules_to_not_convert draft_model_modules_to_not_convert",
    "dict": "blockwise_matmul_config",
    "dict?": """
        on_device_sampling_config chunked_prefill_config kv_quant_config tensor_replacement_config
        tensor_capture_config lora_config hybrid_sharding_config router_config token_tree_config
    """,
    "any": "medusa_tree dma_order_config",
}
KINDS: dict[str, str] = {key: kind for kind, keys in _KEYS_BY_KIND.items() for key in keys.split()}
NEURON_CONFIG_KEYS = frozenset(KINDS)

# Nested configs NxDI builds from dicts, with their keys (NxD ``BlockwiseMatmulConfig.from_kwargs``,
# ``RouterConfig.__init__``, NxDI ``OnDeviceSamplingConfig.__init__``; checked by the same test).
NESTED_KINDS: dict[str, dict[str, str]] = {
    "blockwise_matmul_config": {
        "block_size": "int", "use_block_parallel": "bool", "logical_nc_config": "int",
        "blockwise_nki_autograd_cls": "dict?", "block_sharding_strategy": "str",
        "skip_dma_token": "bool", "skip_dma_weight": "bool", "optimized_block_to_token_mapping": "bool",
        "use_torch_block_wise": "bool", "parallelize_token_to_block_mapping": "bool",
        "always_augment_inputs_for_blockwise_matmul": "bool",
        "use_shard_on_intermediate_dynamic_while": "bool", "use_shard_on_block_dynamic_while": "bool",
        "num_static_blocks": "int?", "pad_num_blocks_to_even": "bool",
    },
    "on_device_sampling_config": {
        "do_sample": "bool", "top_k": "int", "top_p": "float", "temperature": "float", "dynamic": "bool",
        "deterministic": "bool", "global_topk": "int", "on_device_sampling_config": "bool",
        "top_k_kernel_enabled": "bool", "sampling_dp_degree": "int",
    },
}

# Keys NxDI accepts that this package sets itself or that do nothing for this model, and why: given
# by a user they are refused, never silently ignored.
MANAGED_KEYS = {
    "quantized_checkpoints_path": "the plugin points it at the neuron-fp8 conversion of the served model; "
                                  "choose another with the variable KIMI_NEURON_CHECKPOINT",
    "logical_neuron_cores": "it is NxDI's deprecated name; use logical_nc_config",
    "capacity_factor": "it has no effect: NxDI 0.9's MoE builder (initialize_moe_module) never passes it "
                       "to NxD, whose experts then run without a capacity limit (dropless prefill); leave it "
                       "out",
    "router_config": "it has no effect: it configures NxD's RouterTopK, which the Kimi model replaces with "
                     "its own router (sigmoid scores in float32, selection-only bias); leave it out",
}

_KIND_WORDS = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string",
               "ints": "a list of integers", "strs": "a list of strings", "dict": "a JSON object"}

# What `kimi-neuron convert --format neuron-fp8` writes: FP8 e4m3 routed experts with one scale per
# expert and output channel. The served weights are that conversion, so these are not negotiable.
FP8_SCHEME = {"quantized": True, "quantization_type": "expert_wise_per_channel_symmetric",
              "quantization_dtype": "f8e4m3"}
TORCH_DTYPES = ("bfloat16", "float16", "float32")
BLOCK_SIZES = (128, 256, 512, 1024)
FIRST_BUCKET = 128  # NxDI's own autobucketing starts at 128 tokens too


def _is_kind(value: Any, kind: str) -> bool:
    if kind.endswith("?"):
        return value is None or _is_kind(value, kind[:-1])
    if kind == "any":
        return True
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind in ("ints", "strs"):
        item = "int" if kind == "ints" else "str"
        return isinstance(value, list) and all(_is_kind(v, item) for v in value)
    return isinstance(value, dict)


def _kind_text(kind: str) -> str:
    text = _KIND_WORDS[kind.rstrip("?")]
    return f"{text} or null" if kind.endswith("?") else text


def _key_problems(where: str, given: Mapping[str, Any], kinds: Mapping[str, str]) -> list[str]:
    problems = []
    for key, value in given.items():
        name = f"{where}{key}"
        if not isinstance(key, str):
            problems.append(f"{name!r}: keys must be strings")
        elif key in MANAGED_KEYS and not where:
            problems.append(f"{name}: {MANAGED_KEYS[key]}")
        elif key not in kinds:
            underscored = key.replace("-", "_")
            if "-" in key and underscored in kinds:
                problems.append(f"{name}: use underscores: {where}{underscored} (NxDI ignores {key!r})")
            else:
                close = difflib.get_close_matches(underscored, list(kinds), n=1, cutoff=0.6)
                hint = (f"did you mean {where}{close[0]}?" if close
                        else "see NxDI's NeuronConfig/MoENeuronConfig")
                problems.append(f"{name}: unknown key ({hint}); NxDI would only log a warning and ignore it")
        elif not _is_kind(value, kinds[key]):
            problems.append(f"{name} must be {_kind_text(kinds[key])}, got {value!r} "
                            f"({type(value).__name__})")
        elif key in NESTED_KINDS and not where and isinstance(value, dict):
            problems += _key_problems(f"{key}.", value, NESTED_KINDS[key])
    return problems


def _raise(problems: list[str], what: str = "override_neuron_config") -> None:
    if len(problems) == 1:
        raise OverrideError(f"{what}: {problems[0]}")
    if problems:
        raise OverrideError(f"{what}: {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))


def validate_overrides(user: Mapping[str, Any]) -> dict[str, Any]:
    """Names and types of a user's ``override_neuron_config``; returns a deep copy. Combinations
    are checked by :func:`merge`, which knows the defaults they combine with."""
    if not isinstance(user, Mapping):
        raise OverrideError(f"override_neuron_config must be a JSON object, got {type(user).__name__}")
    _raise(_key_problems("", user, KINDS))
    return copy.deepcopy(dict(user))


def validate_additional_config(additional: Mapping[str, Any]) -> dict[str, Any]:
    """The validated ``override_neuron_config`` inside vLLM's ``--additional-config``.

    ``max_prompt_length`` (which vllm-neuron enforces as ``max_context_length`` and refuses when the
    two differ) is carried over as ``max_context_length``, so the plan's buckets follow it.
    """
    if not isinstance(additional, Mapping):
        raise OverrideError(f"--additional-config must be a JSON object, got {type(additional).__name__}")
    problems = []
    for key in additional:
        if isinstance(key, str) and "-" in key and key.replace("-", "_") in ("override_neuron_config",
                                                                           "max_prompt_length"):
            problems.append(f"{key!r}: use underscores: {key.replace('-', '_')}. vllm-neuron reads only the "
                            "underscored key and silently ignores this one (its 0.5.0 README shows the "
                            "hyphenated form, which does nothing)")
    _raise(problems, "--additional-config")
    override = additional.get("override_neuron_config") or {}
    user = validate_overrides(override)
    prompt = additional.get("max_prompt_length")
    if prompt is not None:
        if not _is_kind(prompt, "int") or prompt < 1:
            _raise([f"max_prompt_length must be a positive integer, got {prompt!r}"], "--additional-config")
        if user.get("max_context_length", prompt) != prompt:
            _raise([f"max_prompt_length={prompt} but override_neuron_config.max_context_length="
                    f"{user['max_context_length']}; vllm-neuron refuses the two to differ: give one of them"],
                   "--additional-config")
        user["max_context_length"] = prompt
    return user


def buckets(max_len: int) -> list[int]:
    """Powers of two from 128 below ``max_len``, then ``max_len`` itself."""
    out = []
    size = FIRST_BUCKET
    while size < max_len:
        out.append(size)
        size *= 2
    return [*out, max_len]


def kimi_defaults(cfg: KimiConfig, *, tp_degree: int, max_num_seqs: int, max_model_len: int,
                  ep_degree: int = 1, moe_tp_degree: int | None = None, moe_ep_degree: int = 1,
                  lnc: int = 2, max_context_length: int | None = None) -> dict[str, Any]:
    """The NeuronConfig Kimi-K2 is served with, before the user's overrides."""
    context = max_context_length or max_model_len
    return {
        # vLLM's --tensor-parallel-size is NxDI's tp_degree (vLLM runs one worker; NxDI does the TP).
        # ep_degree > 1 is whole-model expert parallelism: world = tp_degree * ep_degree ranks, with
        # the routed experts split moe_tp_degree x moe_ep_degree over that world.
        "tp_degree": tp_degree,
        "ep_degree": ep_degree,
        "moe_tp_degree": tp_degree * ep_degree // moe_ep_degree if moe_tp_degree is None else moe_tp_degree,
        "moe_ep_degree": moe_ep_degree,
        # trn2 cores in pairs: without it compile fails (NCC_IBIR297, DeepSeek contrib README), and NxD's
        # blockwise MoE kernels exist only for LNC 2.
        "logical_nc_config": lnc,
        # vLLM's slots are range(max_num_seqs) = NxDI seq_ids = KV rows, and NxDI pads every decode
        # batch to max_batch_size: only batch_size/ctx_batch_size/tkg_batch_size change compiled shapes.
        "batch_size": max_num_seqs,
        "tkg_batch_size": max_num_seqs,
        "max_batch_size": max_num_seqs,
        # NxDI continuous batching prefills one sequence at a time (vllm-neuron schedules it so).
        "ctx_batch_size": 1,
        # Also for max_num_seqs 1, where vllm-neuron would turn it off and NxDI's other KV path
        # ignores the seq_ids vLLM sends.
        "is_continuous_batching": True,
        # One contiguous KV row per sequence: the block layout (prefix caching, chunked prefill) makes
        # NxDI pass a cache to prefill, which KimiAttention takes for decode. vLLM's own switches are
        # turned off before it builds its config (neuron.hooks.fit_engine_args).
        "is_prefix_caching": False,
        "is_block_kv_layout": False,
        "seq_len": max_model_len,
        "max_context_length": context,
        # Without enable_bucketing NxDI ignores the bucket lists and runs every prompt at full length.
        "enable_bucketing": True,
        "context_encoding_buckets": buckets(context),
        "token_generation_buckets": buckets(max_model_len),
        "torch_dtype": "bfloat16",
        # CPU sampling: vLLM's own sampler with logprobs, penalties and structured output; on-device
        # sampling returns no logprobs and samples only among a global top-256.
        "on_device_sampling_config": None,
        # All four quantization keys, always: vllm-neuron re-adds per_tensor/int8 defaults for any
        # that are missing when "quantized" is overridden (quantized_checkpoints_path is set by the
        # plugin to the conversion it serves).
        **FP8_SCHEME,
        # Everything but the routed experts stays bf16, as converted. NxD matches these as substrings
        # of module paths, so a dense layer is "layers.{i}." with the dot ("layers.1" would also
        # keep layers 10-19's experts out of FP8).
        "modules_to_not_convert": ["self_attn", "shared_experts", "embed_tokens", "lm_head", "norm", "router",
                                   *(f"layers.{i}." for i in range(cfg.first_k_dense_replace))],
        "glu_mlp": True,
        # SDK 2.29 removed the shard_hidden kernel that NxD picks at LNC 2 unless a dynamic-while kernel
        # is chosen (NotImplementedError "not imported from nkilib"); shard-on-block with PING_PONG is
        # the one GLM-4.7-Flash and MiMo FP8 ran. Its own LNC would otherwise be the platform's.
        "blockwise_matmul_config": {"use_shard_on_block_dynamic_while": True,
                                    "block_sharding_strategy": "PING_PONG", "logical_nc_config": lnc},
        # Our router returns the final weights (normalised, times routed_scaling_factor).
        "disable_normalize_top_k_affinities": True,
        # Compile writes one weight file per rank, so later starts load without re-sharding 1 TB.
        "save_sharded_checkpoint": True,
    }


# Nested configs merged key by key, so {"blockwise_matmul_config": {"block_size": 256}} keeps the
# kernel choice. (on_device_sampling_config defaults to null: a user dict replaces it whole.)
_MERGED_BY_KEY = ("blockwise_matmul_config",)
_BATCH_KEYS = ("batch_size", "tkg_batch_size", "max_batch_size", "kv_cache_batch_size")


def merge(defaults: Mapping[str, Any], user: Mapping[str, Any],
          cfg: KimiConfig) -> tuple[dict[str, Any], list[str]]:
    """``defaults`` with ``user`` on top (user wins), or :class:`OverrideError` naming every
    combination that cannot work. Returns the merged config and warnings about allowed choices."""
    merged = copy.deepcopy(dict(defaults))
    for key, value in user.items():
        if key in _MERGED_BY_KEY and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **copy.deepcopy(value)}
        else:
            merged[key] = copy.deepcopy(value)
    problems: list[str] = []
    warnings: list[str] = []
    _check_batching(defaults, merged, problems, warnings)
    _check_lengths(defaults, merged, problems, warnings)
    _check_parallelism(defaults, merged, problems)
    _check_moe(merged, problems)
    _check_weights(merged, problems)
    _check_sampling(merged, warnings)
    _raise(problems)
    return merged, warnings


def _check_batching(defaults: Mapping[str, Any], m: dict[str, Any], problems: list[str],
                    warnings: list[str]) -> None:
    seqs = defaults["batch_size"]
    for key in _BATCH_KEYS:
        if key in m and m[key] != seqs:
            problems.append(f"{key}={m[key]} but max_num_seqs is {seqs}: vLLM hands out slots "
                            "range(max_num_seqs) and NxDI pads decode to max_batch_size, so "
                            f"{', '.join(_BATCH_KEYS)} all follow --max-num-seqs; set --max-num-seqs "
                            f"{m[key]} instead")
    if m["is_continuous_batching"]:
        if m["ctx_batch_size"] != 1:
            problems.append(f"ctx_batch_size={m['ctx_batch_size']} with continuous batching: NxDI "
                            "prefills one sequence at a time (ctx_batch_size 1); leave it out")
    elif seqs > 1:
        problems.append(f"is_continuous_batching=false with max_num_seqs {seqs}: vLLM puts each sequence in "
                        "its own KV slot, which NxDI tracks only with continuous batching; leave it out")
    else:
        warnings.append("is_continuous_batching=false: NxDI's other KV path ignores the slot vLLM sends "
                        "(fine for max_num_seqs 1, not what this package tests)")


def _check_lengths(defaults: Mapping[str, Any], m: dict[str, Any], problems: list[str],
                   warnings: list[str]) -> None:
    model_len = defaults["seq_len"]
    for key in ("seq_len", "max_length"):
        if key in m and m[key] != model_len:
            problems.append(f"{key}={m[key]} but max_model_len is {model_len}: the KV cache must hold what "
                            f"vLLM schedules; set --max-model-len {m[key]} instead")
    context = m["max_context_length"]
    if not 1 <= context <= model_len:
        problems.append(f"max_context_length={context} must be between 1 and max_model_len {model_len}")
    if not m["enable_bucketing"]:
        warnings.append("enable_bucketing=false: every prompt is prefilled at max_context_length and every "
                        "decode step attends over the whole max_model_len")
        return
    for key, top in (("context_encoding_buckets", context), ("token_generation_buckets", model_len)):
        given = m.get(key)
        if given is None:
            continue
        if not given or given != sorted(set(given)) or given[0] < 1 or given[-1] != top:
            problems.append(f"{key}={given}: must be increasing positive lengths ending at {top} "
                            f"({'max_context_length' if top == context else 'max_model_len'}), or longer "
                            "requests have no compiled graph")


def _check_parallelism(defaults: Mapping[str, Any], m: dict[str, Any], problems: list[str]) -> None:
    if m["tp_degree"] != defaults["tp_degree"]:
        problems.append(f"tp_degree={m['tp_degree']} but --tensor-parallel-size is {defaults['tp_degree']}: "
                        f"NxDI's tp_degree is vLLM's tensor-parallel size; set --tensor-parallel-size "
                        f"{m['tp_degree']} instead")
    lnc = m["logical_nc_config"]
    if lnc not in (1, 2):
        problems.append(f"logical_nc_config={lnc}: a trn2 logical NeuronCore is 1 or 2 physical cores")
    world = m["tp_degree"] * m["ep_degree"]
    if m.get("world_size", world) != world:
        problems.append(f"world_size={m['world_size']} but tp_degree*ep_degree is {world}; leave it out")
    if m["ep_degree"] > 1 and (m["moe_tp_degree"], m["moe_ep_degree"]) != (m["tp_degree"], m["ep_degree"]):
        problems.append(f"ep_degree={m['ep_degree']} with moe_tp_degree={m['moe_tp_degree']}, moe_ep_degree="
                        f"{m['moe_ep_degree']}: with whole-model expert parallelism only moe_tp_degree = "
                        "tp_degree and moe_ep_degree = ep_degree is shown correct (NxD/NxDI executed on CPU, "
                        "tests/neuron_cpu); leave the moe_* degrees out")
    moe_world = m["moe_tp_degree"] * m["moe_ep_degree"]
    if moe_world != world:
        problems.append(f"moe_tp_degree*moe_ep_degree = {m['moe_tp_degree']}*{m['moe_ep_degree']} = "
                        f"{moe_world} must equal tp_degree*ep_degree = {world} (NxD splits the experts over "
                        "every rank)")
    if m.get("is_prefix_caching") or m.get("is_block_kv_layout") or m.get("chunked_prefill_config"):
        problems.append("prefix caching, chunked prefill and the block KV layout are not supported for "
                        "Kimi-K2 (one contiguous KV row per sequence); serve with --no-enable-prefix-caching")


def _check_moe(m: dict[str, Any], problems: list[str]) -> None:
    if not m["glu_mlp"]:
        problems.append("glu_mlp=false: Kimi-K2's experts are gated (gate and up projections); leave it out")
    if not m["disable_normalize_top_k_affinities"]:
        problems.append("disable_normalize_top_k_affinities=false: the Kimi router already returns "
                        "normalised weights times routed_scaling_factor; normalising again would undo the "
                        "scaling")
    if m.get("hybrid_sharding_config") is not None:
        problems.append("hybrid_sharding_config keeps a second copy of every expert weight (one per phase); "
                        "Kimi-K2's experts alone fill most of HBM; leave it out")
    block = m["blockwise_matmul_config"]
    if block.get("logical_nc_config", m["logical_nc_config"]) != m["logical_nc_config"]:
        problems.append(f"blockwise_matmul_config.logical_nc_config={block['logical_nc_config']} but "
                        f"logical_nc_config is {m['logical_nc_config']}; leave the nested one out")
    if block.get("block_size", 512) not in BLOCK_SIZES:
        problems.append(f"blockwise_matmul_config.block_size={block['block_size']}: NxD's kernels take "
                        f"{', '.join(map(str, BLOCK_SIZES))}")
    if block.get("block_sharding_strategy", "HI_LO") not in ("HI_LO", "PING_PONG"):
        problems.append("blockwise_matmul_config.block_sharding_strategy="
                        f"{block['block_sharding_strategy']!r}: NxD takes 'HI_LO' or 'PING_PONG'")
    on_block = block.get("use_shard_on_block_dynamic_while", False)
    on_intermediate = block.get("use_shard_on_intermediate_dynamic_while", False)
    if on_block and on_intermediate:
        problems.append("blockwise_matmul_config: use_shard_on_block_dynamic_while and "
                        "use_shard_on_intermediate_dynamic_while together (NxD asserts); choose one")
    elif m["logical_nc_config"] == 2 and not (on_block or on_intermediate
                                              or block.get("use_torch_block_wise")):
        problems.append("blockwise_matmul_config selects no dynamic-while kernel: at LNC 2 NxD then calls "
                        "the shard_hidden kernel, which SDK 2.29 removed (NotImplementedError at the first "
                        "long prompt); keep use_shard_on_block_dynamic_while")


def _check_weights(m: dict[str, Any], problems: list[str]) -> None:
    # vllm-neuron's half-given trap (it re-adds per_tensor/int8 when only "quantized" is overridden)
    # cannot happen here: the merged config always carries all four keys. What can go wrong is a
    # scheme that is not the one the served conversion holds.
    wrong = {k: m[k] for k, v in FP8_SCHEME.items() if m[k] != v}
    if wrong:
        problems.append(f"{wrong}: the served weights are the neuron-fp8 conversion ({FP8_SCHEME}); NxDI "
                        "would misread them. Leave the quantization keys out")
    if m["torch_dtype"] not in TORCH_DTYPES:
        problems.append(f"torch_dtype={m['torch_dtype']!r}: use one of {', '.join(TORCH_DTYPES)}")
    if m.get("attention_dtype") not in (None, *TORCH_DTYPES):
        problems.append(f"attention_dtype={m['attention_dtype']!r}: use null or one of "
                        f"{', '.join(TORCH_DTYPES)}")


def _check_sampling(m: dict[str, Any], warnings: list[str]) -> None:
    sampling = m.get("on_device_sampling_config")
    if sampling is not None:
        top = sampling.get("global_topk", 256)
        warnings.append("on-device sampling: no logprobs, penalties, min_p or logit bias, structured output "
                        f"is ignored, and requests sample among a global top-{min(top, 256)} (vllm-neuron "
                        "caps top_k at 256); on_device_sampling_config: null keeps vLLM's CPU sampler")
