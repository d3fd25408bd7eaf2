"""The tensors of a Kimi-K2 / DeepSeek-V3 checkpoint: names, shapes and dtypes, from the config.

The one place that knows the checkpoint's tensor names. :func:`validate` checks a checkpoint
against them from the shard headers alone (seconds, even for 1 TB), so a broken download fails
before hours of computation, with the file and tensor named.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .checkpoint import CheckpointError, CheckpointIndex
from .config import KimiConfig
from .fp8 import SCALE_SUFFIX
from .model.mla import MlaWeights
from .model.moe import MlpWeights

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
FLOAT_DTYPES = ("BF16", "F16", "F32")
FP8_DTYPE_NAME = "F8_E4M3"


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def scale_name(weight: str) -> str:
    return weight[: -len("weight")] + SCALE_SUFFIX


def linear_shapes(cfg: KimiConfig) -> dict[str, tuple[int, int]]:
    """Every linear weight (FP8 in the real checkpoint), ``name -> (out, in)``, in file order."""
    h = cfg.hidden_size
    shapes: dict[str, tuple[int, int]] = {}
    for layer in range(cfg.num_hidden_layers):
        p = layer_prefix(layer)
        attn = p + "self_attn."
        if cfg.q_lora_rank is None:
            shapes[attn + "q_proj.weight"] = (cfg.num_attention_heads * cfg.qk_head_dim, h)
        else:
            shapes[attn + "q_a_proj.weight"] = (cfg.q_lora_rank, h)
            shapes[attn + "q_b_proj.weight"] = (cfg.num_attention_heads * cfg.qk_head_dim, cfg.q_lora_rank)
        shapes[attn + "kv_a_proj_with_mqa.weight"] = (cfg.kv_cache_width, h)
        shapes[attn + "kv_b_proj.weight"] = (
            cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim),
            cfg.kv_lora_rank,
        )
        shapes[attn + "o_proj.weight"] = (h, cfg.num_attention_heads * cfg.v_head_dim)
        if cfg.is_moe_layer(layer):
            shared = cfg.moe_intermediate_size * cfg.n_shared_experts
            mlps = [(f"{p}mlp.experts.{e}.", cfg.moe_intermediate_size) for e in range(cfg.n_routed_experts)]
            mlps.append((p + "mlp.shared_experts.", shared))
        else:
            mlps = [(p + "mlp.", cfg.intermediate_size)]
        for prefix, width in mlps:
            shapes[prefix + "gate_proj.weight"] = (width, h)
            shapes[prefix + "up_proj.weight"] = (width, h)
            shapes[prefix + "down_proj.weight"] = (h, width)
    return shapes


def tensor_shapes(cfg: KimiConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint except FP8 scales, ``name -> shape``."""
    h = cfg.hidden_size
    shapes: dict[str, tuple[int, ...]] = {EMBED: (cfg.vocab_size, h)}
    for layer in range(cfg.num_hidden_layers):
        p = layer_prefix(layer)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        if cfg.q_lora_rank is not None:
            shapes[p + "self_attn.q_a_layernorm.weight"] = (cfg.q_lora_rank,)
        shapes[p + "self_attn.kv_a_layernorm.weight"] = (cfg.kv_lora_rank,)
        if cfg.is_moe_layer(layer):
            shapes[p + "mlp.gate.weight"] = (cfg.n_routed_experts, h)
            shapes[p + "mlp.gate.e_score_correction_bias"] = (cfg.n_routed_experts,)
    shapes.update(linear_shapes(cfg))
    shapes[FINAL_NORM] = (h,)
    shapes[LM_HEAD] = (cfg.vocab_size, h)
    return shapes


def layer_bytes(index: CheckpointIndex, cfg: KimiConfig) -> list[int]:
    """Bytes on disk of each decoder layer (weights and scales), from the shard headers."""
    sizes = [0] * cfg.num_hidden_layers
    for name in index.weight_map:
        if name.startswith("model.layers."):
            layer = int(name.split(".")[2])
            if layer < cfg.num_hidden_layers:
                _, entry = index.entry(name)
                sizes[layer] += entry.stop - entry.start
    return sizes


def validate(index: CheckpointIndex, cfg: KimiConfig) -> None:
    """Check that every tensor the config implies exists with the right shape and dtype.

    Linear weights may be FP8 e4m3 (then with a float32 ``weight_scale_inv`` of one value per
    block) or a float type; everything else must be a float type.
    """
    linears = linear_shapes(cfg)
    for name, shape in tensor_shapes(cfg).items():
        path, entry = index.entry(name)
        if entry.shape != shape:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {list(entry.shape)} but config.json implies "
                f"{list(shape)}: the checkpoint and its config.json do not belong together"
            )
        if name in linears and entry.dtype == FP8_DTYPE_NAME:
            _validate_scale(index, cfg, path, name, shape)
        elif entry.dtype not in FLOAT_DTYPES:
            allowed = (*FLOAT_DTYPES, FP8_DTYPE_NAME) if name in linears else FLOAT_DTYPES
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {entry.dtype}; expected one of {list(allowed)}"
            )


def _validate_scale(
    index: CheckpointIndex, cfg: KimiConfig, path: object, name: str, shape: tuple[int, ...]
) -> None:
    if cfg.quantization is None:
        raise CheckpointError(
            f"{path}: tensor {name!r} is FP8 but config.json has no quantization_config; "
            "restore the checkpoint's original config.json"
        )
    scale = scale_name(name)
    if scale not in index.weight_map:
        raise CheckpointError(f"{path}: FP8 tensor {name!r} has no {scale!r} in the index")
    scale_path, entry = index.entry(scale)
    block = cfg.quantization.block
    expected = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    if entry.shape != expected or entry.dtype != "F32":
        raise CheckpointError(
            f"{scale_path}: tensor {scale!r} is {entry.dtype} {list(entry.shape)}; a {list(shape)} "
            f"weight with {block[0]}x{block[1]} blocks needs F32 {list(expected)}"
        )


# -- per-layer weight bundles for the math in vllm_kimi_neuron.model ------------------------------
Getter = Callable[[str], torch.Tensor]


def mla_weights(get: Getter, cfg: KimiConfig, layer: int) -> MlaWeights:
    a = layer_prefix(layer) + "self_attn."
    if cfg.q_lora_rank is None:
        query = {"q_proj": get(a + "q_proj.weight")}
    else:
        query = {name: get(a + name + ".weight") for name in ("q_a_proj", "q_a_layernorm", "q_b_proj")}
    return MlaWeights(
        kv_a_proj_with_mqa=get(a + "kv_a_proj_with_mqa.weight"),
        kv_a_layernorm=get(a + "kv_a_layernorm.weight"),
        kv_b_proj=get(a + "kv_b_proj.weight"),
        o_proj=get(a + "o_proj.weight"),
        **query,
    )


def mlp_weights(get: Getter, prefix: str) -> MlpWeights:
    """``prefix`` is e.g. ``model.layers.0.mlp.`` or ``model.layers.3.mlp.experts.17.``."""
    return MlpWeights(*(get(f"{prefix}{proj}.weight") for proj in ("gate_proj", "up_proj", "down_proj")))
