"""KimiConfig: the one reader (and writer) of a Kimi-K2 / DeepSeek-V3 ``config.json``.

Everything else in the package takes a :class:`KimiConfig`, never a raw dict, so the facts of the
model (which keys exist, which defaults apply, which token ids stop generation) live here only.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ARCHITECTURE = "DeepseekV3ForCausalLM"
MODEL_TYPES = ("kimi_k2", "deepseek_v3")

# Kimi-K2 special-token ids (tokenizer_config.json of Kimi-K2-Instruct); the tokenizer appends
# 256 reserved tokens right after the 163,584 BPE ranks.
BPE_RANKS = 163584
EOS_ID = 163585
IM_END_ID = 163586
SPECIAL_TOKENS: dict[int, tuple[str, bool]] = {
    # id: (text, special) -- tool-call markers are *not* special, so they survive detokenisation
    163584: ("[BOS]", True),
    163585: ("[EOS]", True),
    163586: ("<|im_end|>", True),
    163587: ("<|im_user|>", True),
    163588: ("<|im_assistant|>", True),
    163590: ("<|start_header_id|>", True),
    163591: ("<|end_header_id|>", True),
    163593: ("[EOT]", True),
    163594: ("<|im_system|>", True),
    163595: ("<|tool_calls_section_begin|>", False),
    163596: ("<|tool_calls_section_end|>", False),
    163597: ("<|tool_call_begin|>", False),
    163598: ("<|tool_call_argument_begin|>", False),
    163599: ("<|tool_call_end|>", False),
    163601: ("<|im_middle|>", True),
    163838: ("[UNK]", True),
    163839: ("[PAD]", True),
}


class ConfigError(ValueError):
    """A config.json that is not a Kimi-K2 / DeepSeek-V3 checkpoint, or is self-contradictory."""


@dataclass(frozen=True)
class RopeScaling:
    """DeepSeek-style YaRN parameters (``rope_scaling`` with ``type: yarn``)."""

    factor: float = 64.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 1.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0


@dataclass(frozen=True)
class Fp8BlockQuant:
    """The checkpoint's ``quantization_config``: FP8 e4m3 weights with per-block inverse scales."""

    block: tuple[int, int] = (128, 128)
    fmt: str = "e4m3"
    activation_scheme: str = "dynamic"


@dataclass(frozen=True)
class KimiConfig:
    """Model arguments of Kimi-K2-Instruct-0905; defaults are the real model's values."""

    vocab_size: int = 163840
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 1
    num_attention_heads: int = 64
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 384
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 2.827
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    rope_theta: float = 50000.0
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)
    max_position_embeddings: int = 262144
    tie_word_embeddings: bool = False
    bos_token_id: int = 163584
    eos_token_id: int = EOS_ID
    quantization: Fp8BlockQuant | None = field(default_factory=Fp8BlockQuant)
    model_type: str = "kimi_k2"

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(
                f"model_type {self.model_type!r} is not supported; expected one of {MODEL_TYPES}"
            )
        if self.n_routed_experts % self.n_group:
            raise ConfigError(
                f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}"
            )
        if not 1 <= self.topk_group <= self.n_group:
            raise ConfigError(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds "
                f"n_routed_experts={self.n_routed_experts}"
            )
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ConfigError(
                f"first_k_dense_replace={self.first_k_dense_replace} is outside "
                f"[0, num_hidden_layers={self.num_hidden_layers}]"
            )

    # -- derived facts ------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_width(self) -> int:
        """Values per token and layer in the compressed MLA cache: ``[c_kv | k_pe]``."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    # -- (de)serialisation --------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> KimiConfig:
        archs = raw.get("architectures") or []
        if ARCHITECTURE not in archs:
            raise ConfigError(
                f"{source}: architectures={archs!r} does not include {ARCHITECTURE!r}; "
                "this package serves Kimi-K2 / DeepSeek-V3 checkpoints only"
            )
        if raw.get("scoring_func", "sigmoid") != "sigmoid" or raw.get("topk_method") not in (
            None,
            "noaux_tc",
        ):
            raise ConfigError(
                f"{source}: scoring_func={raw.get('scoring_func')!r} topk_method="
                f"{raw.get('topk_method')!r}; only sigmoid scoring with noaux_tc routing is supported"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {k: raw[k] for k in names & raw.keys()}
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in raw and f.name not in ("quantization", "rope_scaling")
            and f.default is dataclasses.MISSING
        )
        if missing:
            raise ConfigError(f"{source}: missing keys {missing}")
        rope = raw.get("rope_scaling")
        if rope is None:
            kwargs["rope_scaling"] = None
        else:
            kind = rope.get("type", rope.get("rope_type"))
            if kind not in ("yarn", "deepseek_yarn"):
                raise ConfigError(f"{source}: rope_scaling type {kind!r} is not YaRN")
            rope_fields = {f.name for f in dataclasses.fields(RopeScaling)}
            kwargs["rope_scaling"] = RopeScaling(**{k: rope[k] for k in rope_fields & rope.keys()})
        quant = raw.get("quantization_config")
        if quant is None:
            kwargs["quantization"] = None
        else:
            if quant.get("quant_method") != "fp8" or "weight_block_size" not in quant:
                raise ConfigError(
                    f"{source}: quantization_config {quant!r} is not block-wise FP8; "
                    "expected quant_method 'fp8' with weight_block_size"
                )
            kwargs["quantization"] = Fp8BlockQuant(
                block=tuple(quant["weight_block_size"]),
                fmt=quant.get("fmt", "e4m3"),
                activation_scheme=quant.get("activation_scheme", "dynamic"),
            )
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> KimiConfig:
        path = Path(model_dir) / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} not found: is {model_dir} a Hugging Face model directory?") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` dict, in the key set of the real Kimi-K2 checkpoint."""
        out: dict[str, Any] = {
            "architectures": [ARCHITECTURE],
            "model_type": self.model_type,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "moe_layer_freq": 1,
            "num_key_value_heads": self.num_attention_heads,
            "num_nextn_predict_layers": 0,
            "scoring_func": "sigmoid",
            "topk_method": "noaux_tc",
            "torch_dtype": "bfloat16",
            # The real checkpoint's value; transformers 5 also uses it to tell this tokenizer
            # apart from old Mistral ones that need a regex fix.
            "transformers_version": "4.48.3",
            "use_cache": True,
        }
        for f in dataclasses.fields(self):
            if f.name not in ("quantization", "rope_scaling"):
                out[f.name] = getattr(self, f.name)
        out["rope_scaling"] = (
            None
            if self.rope_scaling is None
            else {"type": "yarn", **dataclasses.asdict(self.rope_scaling)}
        )
        if self.quantization is not None:
            out["quantization_config"] = {
                "activation_scheme": self.quantization.activation_scheme,
                "fmt": self.quantization.fmt,
                "quant_method": "fp8",
                "weight_block_size": list(self.quantization.block),
            }
        return dict(sorted(out.items()))


def stop_token_ids(model_dir: str | Path, config: KimiConfig) -> list[int]:
    """Token ids that end generation: generation_config.json's eos ids, plus ``<|im_end|>`` for Kimi.

    Every Kimi assistant turn ends with ``<|im_end|>`` while config.json names ``[EOS]``; a server
    that stops on only one of them runs on past the end of the answer.
    """
    ids = {config.eos_token_id}
    gen_path = Path(model_dir) / "generation_config.json"
    if gen_path.exists():
        eos = json.loads(gen_path.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if config.model_type == "kimi_k2":
        ids.add(IM_END_ID)
    return sorted(ids)


def resolve_model(model: str, revision: str | None = None) -> Path:
    """A local directory for ``model``: the directory itself, or the snapshot of a Hugging Face id
    already in the local cache. Never downloads: the real checkpoint is about 1 TB, and a silent
    download inside a server start would look like a hang."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ConfigError(f"{path} has no config.json: is it a Hugging Face model directory?")
        return path
    if model.startswith(("/", ".", "~")) or model.count("/") != 1:
        raise ConfigError(f"{model!r} is neither a model directory nor a Hugging Face id (org/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision, local_files_only=True))
    except Exception as exc:  # huggingface_hub raises several types for "not in the cache"
        raise ConfigError(
            f"{model!r} is not a local directory and no complete snapshot of it is in the Hugging Face "
            f"cache ({type(exc).__name__}). Download it first (about 1 TB): "
            f"`huggingface-cli download {model}`, or pass the local directory instead of the id"
        ) from None


def cache_home() -> Path:
    """Where this package keeps what it makes: tiny checkpoints, conversions, compiled artifacts."""
    return Path(os.environ.get("KIMI_NEURON_HOME", Path.home() / ".cache" / "vllm-kimi-neuron"))

