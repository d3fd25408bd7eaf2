"""Kimi-K2 for NeuronX Distributed Inference (NxDI 0.9 / NxD, Neuron SDK 2.29).

The only module that builds NxDI/NxD objects; it imports them at the top, so import it only on a
machine with the Neuron SDK (``vllm_kimi_neuron.neuron.hooks`` does, inside vLLM's engine process).
The math is not written here: attention, RoPE, the router and the norms are the functions of
``vllm_kimi_neuron.model`` that the CPU tests prove equal to ``transformers``' DeepseekV3. This file
only wires them to NxD's parallel layers, KV-cache manager and MoE kernels.

What this fixes relative to earlier DeepSeek-V3/Kimi ports (design.md §3):

* Router: ``e_score_correction_bias`` is a selection-only bias (``mlp.router.selection_bias``),
  added after the sigmoid to choose experts; weights are the unbiased scores, normalised, times
  ``routed_scaling_factor`` (:func:`~vllm_kimi_neuron.model.router.choice_from_logits`). NxD's
  ``RouterTopK`` with ``bias=True`` would add it before the sigmoid, changing choice and weights.
* RoPE: cos/sin are computed from each sequence's own ``position_ids`` ``[B, T]``, so a decode
  batch with sequences at different positions rotates each correctly; YaRN takes
  ``original_max_position_embeddings``, ``beta_fast``/``beta_slow`` and the mscales from config.json.
* Prefill is dropless: NxDI's ``initialize_moe_module`` builds NxD's experts without a capacity
  factor (NxD's default: no capacity limit), whatever ``capacity_factor`` says, so the planner sets
  none and refuses one; the blockwise kernel configuration (``use_shard_on_block_dynamic_while``
  with ``PING_PONG``) is the planner's.
* Weights load as converted (``kimi-neuron convert --format neuron-fp8``): names, dtypes and the
  expert-wise per-channel FP8 scales are already what NxD's quantized expert layers hold, so the
  loader only reads tensors (memory-mapped) and NxD slices them per rank. No FP8 re-quantisation
  at load, and ``save_quantized_state_dict`` does nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from neuronx_distributed.modules.moe.routing import RouterTopK
from neuronx_distributed.parallel_layers.layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
)
from neuronx_distributed.parallel_layers.parallel_state import (
    get_expert_model_parallel_size,
    get_tensor_model_parallel_size,
)
from neuronx_distributed_inference.models.config import InferenceConfig, MoENeuronConfig
from neuronx_distributed_inference.models.model_base import NeuronBaseForCausalLM, NeuronBaseModel
from neuronx_distributed_inference.modules.moe_v2 import initialize_moe_module
from neuronx_distributed_inference.utils.hf_adapter import load_pretrained_config
from safetensors import safe_open
from torch import nn

from .. import artifacts, startup
from ..checkpoint import CheckpointError, CheckpointIndex
from ..config import KimiConfig
from ..model import rope
from ..model.mla import MlaDims, MlaWeights, attend_absorbed, attend_decompressed, latents, queries
from ..model.norm import rms_norm
from ..model.router import Routing, choice_from_logits, select

logger = logging.getLogger("vllm.kimi_neuron")

# The tensor that marks a directory as a complete `kimi-neuron convert` output (written last).
CONVERSION_MANIFEST = "kimi_neuron_manifest.json"


def kimi_config(config: InferenceConfig) -> KimiConfig:
    """Our model arguments from the attributes NxDI copied out of config.json (the weights' FP8
    format is the converter's business, so no quantization_config is passed on)."""
    keys = {f.name for f in dataclasses.fields(KimiConfig)} | {"architectures", "scoring_func", "topk_method"}
    raw = {k: getattr(config, k) for k in keys if hasattr(config, k)}
    raw["intermediate_size"] = config.dense_intermediate_size
    raw["model_type"] = config.kimi_model_type
    raw.setdefault("architectures", ["DeepseekV3ForCausalLM"])
    return KimiConfig.from_dict(raw, source="the NxDI InferenceConfig")


class KimiK2InferenceConfig(InferenceConfig):
    """NxDI config for Kimi-K2, loadable from config.json without remote code.

    NxD's expert and shared-expert modules read ``config.intermediate_size``: it becomes the MoE
    width, and the dense layers' width moves to ``dense_intermediate_size``. The KV-cache manager
    then allocates one 576-wide "head" per layer: the MLA latent ``[c_kv | k_pe]``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name, default in (("output_attentions", False), ("output_hidden_states", False),
                              ("return_dict", True), ("hidden_act", "silu")):
            if not hasattr(self, name):
                setattr(self, name, default)
        self.kimi_model_type = getattr(self, "model_type", "kimi_k2")
        self.num_local_experts = self.n_routed_experts
        if not hasattr(self, "dense_intermediate_size"):
            self.dense_intermediate_size = self.intermediate_size
        self.intermediate_size = self.moe_intermediate_size
        # Our router returns final weights (normalised and scaled); NxD must not normalise again.
        self.neuron_config.normalize_top_k_affinities = False
        self.head_dim = self.kv_lora_rank + self.qk_rope_head_dim
        self.num_key_value_heads = 1

    def add_derived_config(self) -> None:
        self.num_cores_per_group = 1

    def get_required_attributes(self) -> list[str]:
        return ["hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "q_lora_rank",
                "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
                "num_experts_per_tok", "moe_intermediate_size", "n_shared_experts", "first_k_dense_replace",
                "routed_scaling_factor", "rms_norm_eps", "rope_theta"]

    @classmethod
    def get_neuron_config_cls(cls) -> type[MoENeuronConfig]:
        return MoENeuronConfig


class KimiRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class KimiAttention(nn.Module):
    """MLA with this rank's heads. Prefill attends decompressed; decode attends absorbed over the
    cached latents, so nothing is expanded per cached token. The cache entry per token is the
    576-wide latent, written to both the K and V slots NxDI's KV manager keeps."""

    def __init__(self, config: KimiK2InferenceConfig) -> None:
        super().__init__()
        cfg = kimi_config(config)
        tp = get_tensor_model_parallel_size()
        if cfg.num_attention_heads % tp:
            raise ValueError(f"num_attention_heads={cfg.num_attention_heads} is not divisible by tp={tp}")
        dtype = config.neuron_config.torch_dtype
        self.dims = MlaDims(cfg.num_attention_heads // tp, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                            cfg.v_head_dim, cfg.kv_lora_rank)
        heads, qk = cfg.num_attention_heads, cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(cfg.hidden_size, heads * qk, bias=False, gather_output=False,
                                               dtype=dtype)
        else:
            # Small and needed by every head: replicated, as in the checkpoint's layout.
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False, dtype=dtype)
            self.q_a_layernorm = KimiRMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = ColumnParallelLinear(cfg.q_lora_rank, heads * qk, bias=False, gather_output=False,
                                                 dtype=dtype)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, cfg.kv_cache_width, bias=False, dtype=dtype)
        self.kv_a_layernorm = KimiRMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        kv_b_out = heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        self.kv_b_proj = ColumnParallelLinear(cfg.kv_lora_rank, kv_b_out, bias=False, gather_output=False,
                                              dtype=dtype)
        self.o_proj = RowParallelLinear(heads * cfg.v_head_dim, cfg.hidden_size, bias=False,
                                        input_is_parallel=True, dtype=dtype,
                                        reduce_dtype=config.neuron_config.rpl_reduce_dtype)
        # No inv_freq buffer: NxDI casts every floating buffer to the model dtype on the device, and
        # bf16 frequencies would rotate far positions wrongly. Computed from the config in forward
        # (a trace makes it an fp32 constant), as NxDI's own RotaryEmbedding does.
        self.rope_config = cfg
        self.rope_scale = rope.cos_sin_scale(cfg)
        self.softmax_scale = rope.softmax_scale(cfg)

    def _weights(self) -> MlaWeights:
        q = (dict(q_proj=self.q_proj.weight) if hasattr(self, "q_proj") else
             dict(q_a_proj=self.q_a_proj.weight, q_a_layernorm=self.q_a_layernorm.weight,
                  q_b_proj=self.q_b_proj.weight))
        return MlaWeights(kv_a_proj_with_mqa=self.kv_a_proj_with_mqa.weight,
                          kv_a_layernorm=self.kv_a_layernorm.weight, kv_b_proj=self.kv_b_proj.weight,
                          o_proj=self.o_proj.weight, **q)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
        past_key_value: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        w = self._weights()
        inv_freq = rope.inverse_frequencies(self.rope_config).to(hidden_states.device)
        cos, sin = rope.cos_sin(position_ids, inv_freq, self.rope_scale)  # per sequence [B, T, 32], fp32
        q_nope, q_pe = queries(hidden_states, w, self.dims, cos, sin)
        active = latents(hidden_states, w, self.dims, cos, sin)  # [B, T, 576]
        mask = attention_mask.squeeze(1).bool()  # [B, T, S]
        if past_key_value is None:  # context encoding: the prompt attends to itself
            out = attend_decompressed(q_nope, q_pe, active, mask, w, self.dims, self.softmax_scale)
        else:  # token generation: the cached latents, then this step's own
            keys = torch.cat((past_key_value[0].squeeze(1).to(active.dtype), active), dim=1)
            own = torch.ones((*mask.shape[:-1], active.shape[1]), dtype=torch.bool, device=mask.device)
            out = attend_absorbed(q_nope, q_pe, keys, torch.cat((mask, own), -1), w, self.dims,
                                  self.softmax_scale)
        cache_entry = active.unsqueeze(1)
        return self.o_proj(out.flatten(-2)), (cache_entry, cache_entry)


class KimiRouter(RouterTopK):
    """NxD router with Kimi's noaux_tc semantics; ``selection_bias`` is the checkpoint's
    ``e_score_correction_bias`` and only ever shifts the choice."""

    def __init__(self, config: KimiK2InferenceConfig) -> None:
        cfg = kimi_config(config)
        super().__init__(num_experts=cfg.n_routed_experts, top_k=cfg.num_experts_per_tok,
                         hidden_size=cfg.hidden_size, dtype=torch.float32, act_fn="sigmoid",
                         sequence_parallel_enabled=config.neuron_config.sequence_parallel_enabled,
                         sequence_dimension=1)
        self.routing = Routing.from_config(cfg)
        # fp32 like the checkpoint; a non-zero start so a trace can never fold it into a constant.
        self.selection_bias = nn.Parameter(torch.arange(cfg.n_routed_experts, dtype=torch.float32) * 1e-6,
                                           requires_grad=False)

    def _apply(self, fn: Any, recurse: bool = True) -> KimiRouter:
        """Module-wide casts (NxDI's ``load_module`` casts every floating tensor whose name does not end
        in "scale" to the model dtype) leave the router in float32: its weight, so the router logits
        are computed in fp32 (NxD casts the hidden states to the weight's dtype), and the selection
        bias, whose small differences decide the expert choice. Device moves still apply; the values
        are loaded afterwards, cast by NxD to these float32 parameters."""

        def keep_float32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            return out.float() if t.dtype == torch.float32 and out.is_floating_point() else out

        return super()._apply(keep_float32, recurse)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.get_router_logits(hidden_states)  # [T, E]
        scores, choice = choice_from_logits(logits, self.selection_bias, self.routing)
        weights, ids = select(scores, choice, self.routing)
        dense = torch.zeros_like(scores).scatter(-1, ids, weights)  # NxD's experts gather from [T, E]
        return logits, dense.to(hidden_states.dtype), ids


class KimiDenseMLP(nn.Module):
    """The first ``first_k_dense_replace`` layers' SwiGLU MLP, tensor-parallel."""

    def __init__(self, config: KimiK2InferenceConfig) -> None:
        super().__init__()
        h, inter, dtype = config.hidden_size, config.dense_intermediate_size, config.neuron_config.torch_dtype
        self.gate_proj = ColumnParallelLinear(h, inter, bias=False, gather_output=False, dtype=dtype)
        self.up_proj = ColumnParallelLinear(h, inter, bias=False, gather_output=False, dtype=dtype)
        self.down_proj = RowParallelLinear(inter, h, bias=False, input_is_parallel=True, dtype=dtype,
                                           reduce_dtype=config.neuron_config.rpl_reduce_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _DivideOutput:
    """A forward hook dividing a module's output by ``n`` (exact when ``n`` is a power of two)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output / self.n


class KimiDecoderLayer(nn.Module):
    def __init__(self, config: KimiK2InferenceConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = KimiAttention(config)
        self.input_layernorm = KimiRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = KimiRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = layer >= config.first_k_dense_replace
        if self.is_moe:
            # NxD's MoE: ExpertMLPsV2 (quantized expert-wise per-channel FP8 after NxDI's layer swap)
            # plus SharedExperts with the checkpoint's names; only the router is ours.
            self.mlp = initialize_moe_module(config=config)
            self.mlp.router = KimiRouter(config)
            replicas = get_expert_model_parallel_size()
            if replicas > 1 and self.mlp.shared_experts is not None:
                # With whole-model expert parallelism NxD's MoE adds the shared experts' partial sums
                # (split over the tp group, reduce_output=False) to the routed output, then all-reduces
                # over all tp*ep ranks: each of the ep replicas of the shared expert would count once.
                self.mlp.shared_experts.register_forward_hook(_DivideOutput(replicas))
        else:
            self.mlp = KimiDenseMLP(config)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        padding_mask: torch.Tensor | None = None, **_: Any,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], None, None, None]:
        attn, cache_entry = self.self_attn(self.input_layernorm(hidden_states), attention_mask, position_ids,
                                           past_key_value)
        h = hidden_states + attn
        x = self.post_attention_layernorm(h)
        mlp = self.mlp(x, padding_mask)[0] if self.is_moe else self.mlp(x)
        # NxDI's model loop reads (hidden, kv, cos_cache, sin_cache, residual); we cache no tables.
        return h + mlp, cache_entry, None, None, None


class NeuronKimiK2Model(NeuronBaseModel):
    """The traced model: embeddings, decoder layers, final norm, lm_head."""

    def setup_attr_for_model(self, config: KimiK2InferenceConfig) -> None:
        self.on_device_sampling = config.neuron_config.on_device_sampling_config is not None
        self.tp_degree = config.neuron_config.tp_degree
        self.hidden_size = config.hidden_size
        self.num_attention_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.max_batch_size = config.neuron_config.max_batch_size
        self.buckets = config.neuron_config.buckets

    def init_model(self, config: KimiK2InferenceConfig) -> None:
        dtype = config.neuron_config.torch_dtype
        self.padding_idx = getattr(config, "pad_token_id", None)
        self.vocab_size = config.vocab_size
        self.embed_tokens = ParallelEmbedding(config.vocab_size, config.hidden_size, self.padding_idx,
                                              dtype=dtype, shard_across_embedding=True)
        self.layers = nn.ModuleList(KimiDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = KimiRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = ColumnParallelLinear(config.hidden_size, config.vocab_size, bias=False,
                                            gather_output=not self.on_device_sampling, dtype=dtype)


class NeuronKimiK2ForCausalLM(NeuronBaseForCausalLM):
    """What vllm-neuron finds under ``MODEL_TYPES["deepseekv3"]["causal-lm"]``."""

    # No get_compiler_args: NxDI's per-submodel neuronx-cc defaults apply (-O1 and the modular-flow
    # threshold for context encoding, -O2 for token generation, its long-context flags and scratchpad
    # page size from 32K tokens, the FP8 reinterpretation flag). Nothing was measured that would
    # justify other flags.
    _model_cls = NeuronKimiK2Model

    @classmethod
    def get_config_cls(cls) -> type[KimiK2InferenceConfig]:
        return KimiK2InferenceConfig

    def compile(self, compiled_model_path: str, *args: Any, **kwargs: Any) -> Any:
        """NxDI's compile as the start's "compiling" phase. neuronx-cc gives nothing to count, so the
        phase is kept alive while it uses CPU, and a compile hung without it is reported as stalled.
        Only when NxDI's compile has returned (traced, compiled and sharded) is the directory marked
        finished: NxDI writes model.pt before sharding the weights."""
        with startup.phase("compiling") as p, p.while_busy():
            result = super().compile(compiled_model_path, *args, **kwargs)
        artifacts.mark_complete(Path(compiled_model_path))
        return result

    def load(self, compiled_model_path: str, *args: Any, **kwargs: Any) -> Any:
        """NxDI's load (weights onto the cores, then its warm-up) as the "loading weights" phase."""
        with startup.phase("loading") as p, p.while_busy():
            return super().load(compiled_model_path, *args, **kwargs)

    @classmethod
    def save_quantized_state_dict(cls, model_path: str, config: InferenceConfig) -> None:
        """Nothing to do: the weights were quantised offline by ``kimi-neuron convert``. (vllm-neuron
        calls this before every compile when ``quantized`` is set; NxDI's version would load the
        whole 1T model through transformers.)"""
        logger.info("vllm-kimi-neuron: weights are pre-quantised by `kimi-neuron convert`; "
                    "skipping save_quantized_state_dict")

    @staticmethod
    def load_hf_model(model_path: str, **kwargs: Any) -> None:
        raise RuntimeError(
            "the Kimi-K2 Neuron model never loads the Hugging Face model; convert the checkpoint with "
            "`kimi-neuron convert --format neuron-fp8` and point quantized_checkpoints_path at the output"
        )

    def checkpoint_loader_fn(self, mmap: bool = False) -> dict[str, torch.Tensor]:
        """The ``neuron-fp8`` conversion, read as stored: memory-mapped tensors under the names NxD
        modules use, which NxD then slices per rank. Refuses anything but a complete conversion."""
        path = Path(self.config.neuron_config.quantized_checkpoints_path or self.model_path)
        return load_neuron_fp8(path)

    @staticmethod
    def convert_hf_to_neuron_state_dict(state_dict: dict[str, torch.Tensor],
                                        config: InferenceConfig) -> dict[str, torch.Tensor]:
        return state_dict  # already in NxD's layout; see checkpoint_loader_fn


def inference_config(model_dir: str | Path, neuron_config: dict[str, Any]) -> KimiK2InferenceConfig:
    """The NxDI config for this request, built as vllm-neuron's loader builds it (NxDI's
    ``MoENeuronConfig`` and ``load_pretrained_config`` over the checkpoint's config.json)."""
    return KimiK2InferenceConfig(MoENeuronConfig(**neuron_config),
                                 load_config=load_pretrained_config(str(model_dir)))


def stored_neuron_config(model_dir: str | Path, neuron_config: dict[str, Any]) -> dict[str, Any]:
    """The ``neuron_config`` section NxDI's compile writes to ``neuron_config.json`` for this request:
    built by NxDI's own classes and serialisation (which rename keys and store objects by their
    ``__dict__``), so a stored config can be compared with a request like with like."""
    return json.loads(inference_config(model_dir, neuron_config).to_json_string())["neuron_config"]


def load_neuron_fp8(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a complete, unsharded ``neuron-fp8`` conversion at ``path``."""
    manifest_path = path / CONVERSION_MANIFEST
    if not manifest_path.exists():
        raise CheckpointError(
            f"{path} is not a complete `kimi-neuron convert` output (no {CONVERSION_MANIFEST}); run "
            f"`kimi-neuron convert --model HF_DIR --out {path} --format neuron-fp8` (rerun it to resume)"
        )
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != "neuron-fp8" or manifest.get("layout") is not None:
        raise CheckpointError(
            f"{path}: format={manifest.get('format')}, layout={manifest.get('layout')}; the Neuron model "
            "loads an unsharded neuron-fp8 conversion (NxD shards it per rank at compile time)"
        )
    index = CheckpointIndex.open(path)
    state: dict[str, torch.Tensor] = {}
    for shard in index.shards:
        with safe_open(str(path / shard), framework="pt") as f:
            for name in index.tensors_in(shard):
                state[name] = f.get_tensor(name)
    return state
