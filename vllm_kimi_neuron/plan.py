"""Deployment planner: instance + request -> parallel layout, HBM budget, NxDI config, serve command.

The same :func:`make_plan` runs inside vLLM's engine process (the Neuron hooks) and behind
``kimi-neuron plan``, so what the command prints is what the server compiles. Plans that cannot
work (uneven splits, a layout larger than the machine) or that do not fit in HBM are refused here,
before anything compiles, with the numbers and what to change.

Memory figures are estimates from shapes and dtypes, not measurements: the weights are exact for
the tensors ``layout.neuron_names`` lists; activations and the runtime reserve are stated
assumptions to be calibrated on hardware.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .config import KimiConfig
from .layout import EXPERTS, ParallelLayout, neuron_names, served_dtype, split_rule
from .overrides import OverrideError, kimi_defaults, merge, validate_overrides

DEFAULT_MODEL = "moonshotai/Kimi-K2-Instruct-0905"
GIB = 1024**3
# Compile plus first load of Kimi-K2 takes tens of minutes; vLLM's API server gives up after 600 s.
ENGINE_READY_TIMEOUT_S = "14400"


class PlanError(ValueError):
    """A deployment that cannot work or does not fit; the message says what to change."""


@dataclass(frozen=True)
class Instance:
    name: str
    chips: int
    cores_per_chip: int  # physical NeuronCore-v3
    hbm_gib_per_chip: float
    default_lnc: int

    def logical_cores(self, lnc: int) -> int:
        return self.chips * self.cores_per_chip // lnc

    def hbm_per_core(self, lnc: int) -> int:
        """Bytes of HBM per logical core, assuming the runtime splits a chip's HBM evenly."""
        return int(self.hbm_gib_per_chip * GIB) * lnc // self.cores_per_chip


# AWS Neuron docs (SDK 2.29), "Trainium2 Architecture": eight NeuronCore-v3 per chip and 96 GiB of
# device memory (4 HBM stacks, 2.9 TB/s) per chip; trn2.48xlarge has 16 chips, trn2.3xlarge one.
# LNC 2 (the trn2 default) pairs physical cores: 64 logical cores of 24 GiB on a trn2.48xlarge.
INSTANCES = {
    "trn2.48xlarge": Instance("trn2.48xlarge", chips=16, cores_per_chip=8, hbm_gib_per_chip=96,
                              default_lnc=2),
    "trn2.3xlarge": Instance("trn2.3xlarge", chips=1, cores_per_chip=8, hbm_gib_per_chip=96,
                             default_lnc=2),
}

# Estimates, to be calibrated on hardware (not measured: no figure here came from a Trainium run).
# Runtime reserve per logical core: the Neuron runtime's own buffers, the compiled graphs' instruction
# streams and DMA rings for every bucket, and collective-communication buffers.
RUNTIME_RESERVE_GIB = 2.0
# Hidden-state sized [T, hidden] tensors live at once during prefill: residual, normed input,
# attention output, routed and shared expert outputs, and one in flight.
HIDDEN_STATE_COPIES = 6

# NxD's token generation: tokens*top_k/experts below this threshold uses selective loading, which
# has no expert-parallel implementation (DEFAULT_SELECTIVE_LOADING_THRESHOLD, model_utils.py).
SELECTIVE_LOADING_THRESHOLD = 1.0
SELECTIVE_LOADING_PATCH = "selective-loading-threshold"

# NxD's blockwise NKI kernel (check_blockwise_mm_kernel_compatibility and
# can_use_blockwise_matmul_nki in modules/moe/blockwise.py, SDK 2.29).
BLOCKWISE_HIDDEN = (512, 8192)
BLOCKWISE_HIDDEN_MULTIPLE = 512
BLOCKWISE_INTERMEDIATE_MULTIPLE = 16

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class Layout:
    lnc: int
    tp_degree: int
    ep_degree: int
    moe_tp_degree: int
    moe_ep_degree: int

    @property
    def world(self) -> int:
        return self.tp_degree * self.ep_degree

    def describe(self) -> str:
        return (f"LNC {self.lnc}; tp_degree {self.tp_degree} x ep_degree {self.ep_degree} = {self.world} "
                f"ranks; routed experts: moe_tp_degree {self.moe_tp_degree} x moe_ep_degree "
                f"{self.moe_ep_degree}")


@dataclass(frozen=True)
class Budget:
    """HBM per logical core, in bytes."""

    capacity: int
    weights: tuple[tuple[str, int, int], ...]  # (group, bytes, of which replicated on every core)
    kv_cache: int
    kv_detail: str
    attention_scores: int
    other_activations: int
    prefill_tokens: int
    reserve: int

    @property
    def weight_total(self) -> int:
        return sum(b for _, b, _ in self.weights)

    @property
    def total(self) -> int:
        activations = self.attention_scores + self.other_activations
        return self.weight_total + self.kv_cache + activations + self.reserve

    @property
    def headroom(self) -> int:
        return self.capacity - self.total

    def rows(self) -> list[tuple[str, int, int | None]]:
        out: list[tuple[str, int, int | None]] = [(f"weights: {g}", b, r) for g, b, r in self.weights]
        out += [
            ("weights, total", self.weight_total, sum(r for _, _, r in self.weights)),
            (f"KV cache: {self.kv_detail}", self.kv_cache, self.kv_cache),
            (f"prefill attention scores at {self.prefill_tokens} tokens (estimate)", self.attention_scores,
             None),
            ("other activations: hidden, router, logits, dequantised experts (estimate)",
             self.other_activations, None),
            (f"runtime reserve (estimate, {RUNTIME_RESERVE_GIB:g} GiB)", self.reserve, None),
            ("total", self.total, None),
            ("capacity", self.capacity, None),
            ("headroom", self.headroom, None),
        ]
        return out


def _group(name: str) -> str:
    if EXPERTS in name:
        return "routed experts (fp8, fp32 scales)"
    if ".mlp.router." in name:
        return "routers"
    if ".shared_experts." in name:
        return "shared experts"
    if "self_attn." in name and not name.endswith("layernorm.weight"):
        return "attention"
    if ".mlp." in name:
        return "dense MLP layers"
    if name.startswith(("embed_tokens.", "lm_head.")):
        return "embedding, lm_head"
    return "norms"


def weight_bytes(cfg: KimiConfig, layout: Layout, torch_dtype: str) -> tuple[tuple[str, int, int], ...]:
    """Bytes per logical core by group: every neuron-fp8 tensor's per-rank shard. Attention, dense,
    shared-expert and embedding tensors split over tp_degree; routed experts over the
    moe_tp_degree x moe_ep_degree grid; replicated tensors count whole on every core (and as the
    second figure of each group)."""
    dense = ParallelLayout(tp=layout.tp_degree, lnc=layout.lnc)
    experts = ParallelLayout(tp=layout.moe_tp_degree * layout.moe_ep_degree, moe_ep=layout.moe_ep_degree,
                             lnc=layout.lnc)
    size = {"bf16": _DTYPE_BYTES[torch_dtype], "fp8": 1, "fp32": 4}
    groups: dict[str, list[int]] = {}
    for name, (dtype, shape) in neuron_names(cfg).items():
        rule = split_rule(name)
        shard = (experts if rule.expert_parallel else dense).shard_shape(name, shape)
        nbytes = math.prod(shard) * size[served_dtype(name, dtype)]
        totals = groups.setdefault(_group(name), [0, 0])
        totals[0] += nbytes
        if shard == shape:
            totals[1] += nbytes
    return tuple(sorted(((g, b, r) for g, (b, r) in groups.items()), key=lambda row: -row[1]))


def kv_cache_bytes(cfg: KimiConfig, nc: Mapping[str, Any]) -> tuple[int, str]:
    """NxDI's KV cache on every core: K and V, each ``[rows, 1, max_length, 576]`` per layer. Kimi's
    one latent "KV head" is replicated to every rank (1 < tp_degree), so no rank holds less."""
    rows = nc.get("kv_cache_batch_size", nc["batch_size"]) + nc.get("kv_cache_padding_size", 0)
    length = nc.get("max_length", nc["seq_len"])
    dtype = nc.get("attention_dtype") or nc["torch_dtype"]
    nbytes = cfg.num_hidden_layers * 2 * rows * length * cfg.kv_cache_width * _DTYPE_BYTES[dtype]
    detail = f"{cfg.num_hidden_layers} layers x K,V x {rows} slots x {length} x {cfg.kv_cache_width} {dtype}"
    return nbytes, detail


def prefill_tokens(nc: Mapping[str, Any]) -> int:
    """The longest prefill graph: the largest context bucket (the whole context without bucketing)."""
    if nc["enable_bucketing"] and nc.get("context_encoding_buckets"):
        return max(nc["context_encoding_buckets"])
    return nc["max_context_length"]


def activation_bytes(cfg: KimiConfig, layout: Layout, nc: Mapping[str, Any]) -> tuple[int, int]:
    """(attention scores, everything else) for the longest prefill, per core; an estimate.

    The prefill form of MLA materialises fp32 scores ``[heads per core, T, T]`` plus a ``[T, T]``
    mask; the rest is hidden-state copies, router scores ``[T, experts]``, the decode step's
    full-vocabulary fp32 logits, which CPU sampling gathers on every core, and one MoE layer's local
    experts dequantised to the model dtype: NxD's blockwise prefill takes the expert-wise scales
    ``[E, 1, out]`` for blockwise ones and dequantises every local expert before its kernel (NxD
    ``modules/moe/blockwise.py``; read from the source, not measured).
    """
    tokens = prefill_tokens(nc)
    heads = cfg.num_attention_heads // layout.tp_degree
    scores = heads * tokens * tokens * 4 + tokens * tokens
    act = _DTYPE_BYTES[nc["torch_dtype"]]
    hidden = HIDDEN_STATE_COPIES * tokens * cfg.hidden_size * act
    router = 2 * tokens * cfg.n_routed_experts * 4
    logits = nc["tkg_batch_size"] * cfg.vocab_size * 4
    local_experts = cfg.n_routed_experts // layout.moe_ep_degree
    per_rank = cfg.moe_intermediate_size // layout.moe_tp_degree
    dequantised = local_experts * 3 * cfg.hidden_size * per_rank * act
    return scores, hidden + router + logits + dequantised


def budget(cfg: KimiConfig, machine: Instance, layout: Layout, nc: Mapping[str, Any]) -> Budget:
    kv, detail = kv_cache_bytes(cfg, nc)
    scores, other = activation_bytes(cfg, layout, nc)
    return Budget(capacity=machine.hbm_per_core(layout.lnc),
                  weights=weight_bytes(cfg, layout, nc["torch_dtype"]), kv_cache=kv, kv_detail=detail,
                  attention_scores=scores, other_activations=other, prefill_tokens=prefill_tokens(nc),
                  reserve=int(RUNTIME_RESERVE_GIB * GIB))


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f}"


@dataclass(frozen=True)
class Plan:
    model: str
    instance: str
    tp: int
    max_num_seqs: int
    max_model_len: int
    layout: Layout
    neuron_config: dict[str, Any]  # the merged override_neuron_config handed to vllm-neuron
    budget: Budget
    patches: list[str] = field(default_factory=list)  # names in neuron.hooks.PLAN_PATCHES
    notes: list[str] = field(default_factory=list)

    def additional_config(self) -> dict[str, Any]:
        return {"override_neuron_config": self.neuron_config}

    def env(self) -> dict[str, str]:
        # The plugin sets it too; explicit here so the command works as printed. No
        # NEURON_LOGICAL_NC_CONFIG: NxDI lets it override logical_nc_config, so it is left unset.
        return {"VLLM_ENGINE_READY_TIMEOUT_S": ENGINE_READY_TIMEOUT_S}

    def serve_args(self) -> list[str]:
        from .launch import TOOL_ARGS

        n = str(self.max_num_seqs)
        return [
            "vllm", "serve", self.model, "--tensor-parallel-size", str(self.tp), "--max-num-seqs", n,
            "--max-model-len", str(self.max_model_len),
            # Contiguous KV: one block of max_model_len per sequence (vllm-neuron known issue 2).
            "--num-gpu-blocks-override", n, "--no-enable-prefix-caching",
            "--trust-remote-code",  # Kimi's tokenizer is remote code
            *TOOL_ARGS,
            "--additional-config", json.dumps(self.additional_config(), separators=(",", ":")),
        ]

    def serve_command(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env().items())
        return f"{env} {shlex.join(self.serve_args())}"

    def table(self) -> str:
        rows = self.budget.rows()
        width = max(len(label) for label, _, _ in rows)
        lines = [f"| {'HBM per logical core':<{width}} |      GiB | same on all cores |",
                 f"|{'-' * (width + 2)}|---------:|------------------:|"]
        for label, nbytes, replicated in rows:
            rep = "" if replicated is None else _gib(replicated)
            lines.append(f"| {label:<{width}} | {_gib(nbytes):>8} | {rep:>17} |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        b = self.budget
        return {
            "model": self.model, "instance": self.instance,
            "request": {"tensor_parallel_size": self.tp, "max_num_seqs": self.max_num_seqs,
                        "max_model_len": self.max_model_len},
            "layout": {**dataclasses.asdict(self.layout), "world": self.layout.world},
            "hbm_bytes_per_core": {"weights": {g: n for g, n, _ in b.weights}, "kv_cache": b.kv_cache,
                                   "attention_scores": b.attention_scores,
                                   "other_activations": b.other_activations, "runtime_reserve": b.reserve,
                                   "total": b.total, "capacity": b.capacity, "headroom": b.headroom},
            "patches": self.patches, "notes": self.notes, "env": self.env(),
            "additional_config": self.additional_config(), "serve_command": self.serve_command(),
        }


def _instance(name: str) -> Instance:
    if name not in INSTANCES:
        raise PlanError(f"unknown instance type {name!r}; known: {', '.join(INSTANCES)}")
    return INSTANCES[name]


def _lnc(machine: Instance, user: Mapping[str, Any]) -> int:
    """NxDI takes the LNC from NEURON_LOGICAL_NC_CONFIG over the logical_nc_config key, so the plan
    does too, and refuses the two disagreeing rather than compile for one and run with the other."""
    env = os.environ.get("NEURON_LOGICAL_NC_CONFIG")
    if env is None:
        lnc = user.get("logical_nc_config", machine.default_lnc)
        if lnc not in (1, 2):
            raise PlanError(f"logical_nc_config={lnc}: a trn2 logical NeuronCore is 1 or 2 physical cores")
        return lnc
    if env not in ("1", "2"):
        raise PlanError(f"NEURON_LOGICAL_NC_CONFIG={env!r}: a trn2 logical NeuronCore is 1 or 2 physical "
                        "cores")
    if user.get("logical_nc_config", int(env)) != int(env):
        raise PlanError(f"NEURON_LOGICAL_NC_CONFIG={env} is set and NxDI lets it override logical_nc_config="
                        f"{user['logical_nc_config']}: unset the variable or drop the override")
    return int(env)


def _divisibility(cfg: KimiConfig, layout: Layout) -> list[str]:
    tp, moe_tp, moe_ep = layout.tp_degree, layout.moe_tp_degree, layout.moe_ep_degree
    needs = [
        ("num_attention_heads", cfg.num_attention_heads, tp, "tp_degree", "attention heads"),
        ("vocab_size", cfg.vocab_size, tp, "tp_degree", "lm_head rows"),
        ("hidden_size", cfg.hidden_size, tp, "tp_degree", "embedding columns"),
        ("intermediate_size", cfg.intermediate_size, tp, "tp_degree", "dense MLP"),
        ("moe_intermediate_size * n_shared_experts", cfg.moe_intermediate_size * cfg.n_shared_experts, tp,
         "tp_degree", "shared experts"),
        ("moe_intermediate_size", cfg.moe_intermediate_size, moe_tp, "moe_tp_degree",
         "routed expert columns"),
        ("n_routed_experts", cfg.n_routed_experts, moe_ep, "moe_ep_degree", "expert groups"),
    ]
    return [f"{what}={n} is not divisible by {by}={d} ({why})" for what, n, d, by, why in needs if n % d]


def _layout(cfg: KimiConfig, machine: Instance, tp: int, lnc: int, user: Mapping[str, Any],
            fits: Callable[[Layout], bool]) -> Layout:
    cores = machine.logical_cores(lnc)
    if not 1 <= tp <= cores:
        raise PlanError(f"--tensor-parallel-size {tp}: a {machine.name} has {cores} logical cores at LNC "
                        f"{lnc}; use 1 to {cores}")
    for key in ("ep_degree", "moe_tp_degree", "moe_ep_degree"):
        if user.get(key, 1) < 1:
            raise PlanError(f"{key}={user[key]}: parallel degrees are positive integers")
    ep = user.get("ep_degree")
    if ep is None:
        ep = 1
        trial = Layout(lnc, tp, 1, tp, 1)
        spare = cores // tp
        chosen = any(k in user for k in ("moe_tp_degree", "moe_ep_degree"))
        if spare > 1 and not chosen and not _divisibility(cfg, trial) and not fits(trial):
            # Whole-model expert parallelism fills the machine, world = tp*ep, with the experts split
            # tp x ep (NxDI PR #131's TP 32 x EP 2): only the expert weights per core shrink.
            ep = max(d for d in range(1, spare + 1) if cfg.n_routed_experts % d == 0)
    world = tp * ep
    moe_ep, moe_tp = user.get("moe_ep_degree"), user.get("moe_tp_degree")
    if moe_ep is None:
        moe_ep = ep if moe_tp is None else max(1, world // moe_tp)
    if moe_tp is None:
        moe_tp = max(1, world // moe_ep)
    layout = Layout(lnc, tp, ep, moe_tp, moe_ep)
    if world > cores:
        raise PlanError(f"tp_degree {tp} x ep_degree {ep} = {world} ranks: a {machine.name} has {cores} "
                        f"logical cores at LNC {lnc}")
    problems = _divisibility(cfg, layout) if moe_tp * moe_ep == world else []
    if problems:
        raise PlanError(f"{layout.describe()} does not fit the model: " + "; ".join(problems))
    return layout


def _shape_free(user: Mapping[str, Any]) -> dict[str, Any]:
    """The user's overrides without the keys that follow --max-num-seqs / --max-model-len."""
    shaped = {"batch_size", "tkg_batch_size", "max_batch_size", "kv_cache_batch_size", "seq_len",
              "max_length", "max_context_length", "context_encoding_buckets", "token_generation_buckets"}
    return {k: v for k, v in user.items() if k not in shaped}


def _configure(cfg: KimiConfig, machine: Instance, tp: int, seqs: int, length: int,
               user: Mapping[str, Any]) -> tuple[Layout, dict[str, Any], list[str], Budget]:
    lnc = _lnc(machine, user)

    def config_for(layout: Layout) -> tuple[dict[str, Any], list[str]]:
        defaults = kimi_defaults(cfg, tp_degree=tp, max_num_seqs=seqs, max_model_len=length,
                                 ep_degree=layout.ep_degree, moe_tp_degree=layout.moe_tp_degree,
                                 moe_ep_degree=layout.moe_ep_degree, lnc=lnc,
                                 max_context_length=user.get("max_context_length"))
        return merge(defaults, user, cfg)

    def fits(layout: Layout) -> bool:
        return budget(cfg, machine, layout, config_for(layout)[0]).headroom >= 0

    layout = _layout(cfg, machine, tp, lnc, user, fits)
    nc, warnings = config_for(layout)
    return layout, nc, warnings, budget(cfg, machine, layout, nc)


def _largest(fits: Callable[[int], bool], low: int, high: int) -> int | None:
    """The largest n in [low, high] with fits(n), for fits monotone decreasing; None if none."""
    if high < low or not fits(low):
        return None
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def _refusal(cfg: KimiConfig, machine: Instance, tp: int, seqs: int, length: int, user: Mapping[str, Any],
             layout: Layout, b: Budget) -> PlanError:
    parts = (f"weights {_gib(b.weight_total)}, KV cache {_gib(b.kv_cache)}, prefill activations "
             f"{_gib(b.attention_scores + b.other_activations)}, runtime reserve {_gib(b.reserve)}")
    head = (f"does not fit: {_gib(b.total)} GiB per logical core needed ({parts}), {_gib(b.capacity)} GiB "
            f"available on a {machine.name} with {layout.describe()}")
    free = _shape_free(user)

    def fits(s: int, n: int) -> bool:
        try:
            return _configure(cfg, machine, tp, s, n, free)[3].headroom >= 0
        except (PlanError, OverrideError):
            return False

    step = 128
    best_len = _largest(lambda k: fits(seqs, k * step), 1, (length - 1) // step)
    best_seqs = _largest(lambda s: fits(s, length), 1, seqs - 1)
    if best_len is None and best_seqs is None and not fits(1, min(step, length)):
        more = ("raise --tensor-parallel-size" if layout.world < machine.logical_cores(layout.lnc)
                else "this layout already uses every logical core: it needs a larger instance")
        return PlanError(f"{head}. Even --max-num-seqs 1 --max-model-len {step} does not fit: {more}")
    options = []
    if best_len is not None:
        options.append(f"lower --max-model-len (at --max-num-seqs {seqs}, up to {best_len * step} fits)")
    if best_seqs is not None:
        options.append(f"lower --max-num-seqs (at --max-model-len {length}, up to {best_seqs} fits)")
    if not options:
        options.append("lower both --max-num-seqs and --max-model-len")
    if layout.world < machine.logical_cores(layout.lnc):
        options.append("raise --tensor-parallel-size")
    return PlanError(f"{head}. To fit: " + ", or ".join(options))


def _decode_notes(cfg: KimiConfig, layout: Layout, b: Budget, seqs: int) -> tuple[list[str], list[str]]:
    experts = cfg.n_routed_experts
    top_k = cfg.num_experts_per_tok
    ratio = seqs * top_k / experts
    need = math.ceil(experts * SELECTIVE_LOADING_THRESHOLD / top_k)
    expert_gib = _gib(dict((g, n) for g, n, _ in b.weights).get("routed experts (fp8, fp32 scales)", 0))
    local = experts // layout.moe_ep_degree
    if layout.moe_ep_degree > 1 and ratio < SELECTIVE_LOADING_THRESHOLD:
        return [SELECTIVE_LOADING_PATCH], [
            f"decode with moe_ep_degree {layout.moe_ep_degree} at batch {seqs}: {seqs}*{top_k}/{experts} = "
            f"{ratio:.2f} < {SELECTIVE_LOADING_THRESHOLD:g}, where NxD's token generation raises 'Selective "
            f"Loading with Expert parallelism is not supported'. Patch {SELECTIVE_LOADING_PATCH} sets NxD's "
            f"threshold to 0.0: every decode step runs all {local} local experts and reads all {expert_gib} "
            f"GiB of expert weights per core, whatever the batch. --max-num-seqs {need} or more needs no "
            "patch"]
    if ratio < SELECTIVE_LOADING_THRESHOLD:
        return [], [f"decode at batch {seqs} < {need}: NxD loads only the chosen experts' weights per token "
                    f"(selective loading), so decode reads grow with the batch up to {need}"]
    return [], [f"decode at batch {seqs} >= {need}: NxD runs all {local} local experts every step "
                f"({expert_gib} GiB of expert weights read per core)"]


def _kernel_notes(cfg: KimiConfig, layout: Layout) -> list[str]:
    per_rank = cfg.moe_intermediate_size // layout.moe_tp_degree
    notes = []
    if layout.moe_ep_degree > 1:
        notes.append("expert parallelism: NxD/NxDI's own code runs this layout's model correctly on CPU "
                     "(tests/neuron_cpu: tp 2 x ep 2 and tp 1 x ep 4 equal the reference), but CPU mode "
                     "never runs the NKI kernels, and NxDI PR #131 saw wrong prefill output from SDK 2.29's "
                     "dynamic-while blockwise kernels at moe_ep 2 on hardware (then with blockwise FP8 "
                     "scales). Until a trn2 shows otherwise, prefill at this layout is unverified: run "
                     "check-accuracy before serving; TP 64 (moe_ep_degree 1) is the layout with public "
                     "correct output on SDK 2.29")
    reasons = []
    low, high = BLOCKWISE_HIDDEN
    if not low <= cfg.hidden_size <= high or cfg.hidden_size % BLOCKWISE_HIDDEN_MULTIPLE:
        reasons.append(f"hidden_size {cfg.hidden_size} must be a multiple of {BLOCKWISE_HIDDEN_MULTIPLE} "
                       f"in [{low}, {high}]")
    if per_rank % BLOCKWISE_INTERMEDIATE_MULTIPLE:
        reasons.append(f"moe_intermediate_size/moe_tp_degree = {per_rank} must be a multiple of "
                       f"{BLOCKWISE_INTERMEDIATE_MULTIPLE}")
    if layout.lnc != 2:
        reasons.append("the kernels exist only for LNC 2")
    notes.append("prefill MoE (read from NxD 0.18's source, not run): the blockwise path treats the "
                 "expert-wise FP8 scales [E, 1, out] as blockwise, dequantises each layer's local experts "
                 "to bf16 before its kernel (counted under other activations), and runs the kernel in bf16 "
                 f"with {cfg.num_experts_per_tok} experts per token, which the FP8 kernel would not take "
                 "('lnc=2 blockwise kernel does not support multi expert per token')")
    if reasons:
        notes.append("prefill MoE: NxD's blockwise NKI kernel cannot run here (" + "; ".join(reasons)
                     + "), so NxD uses its PyTorch blockwise path: slower, and NxDI PR #131 reports it "
                     "failing with expert parallelism")
    return notes


# What a bare `vllm serve MODEL --tensor-parallel-size N` gets: a decode batch of 8 (NxDI's
# token-generation graph is compiled for exactly this batch) and the longest context, in steps of
# 1024 tokens, that then fits in HBM. vLLM's own defaults (the model's 262144 tokens, 128+ sequences)
# never fit.
DEFAULT_MAX_NUM_SEQS = 8
LENGTH_STEP = 1024
# Upper bound for --max-num-seqs when only --max-model-len is given: vllm-neuron's own default.
MAX_DEFAULT_SEQS = 32


def default_shape(cfg: KimiConfig, instance: str, tp: int, max_num_seqs: int | None,
                  max_model_len: int | None, overrides: Mapping[str, Any] | None = None) -> tuple[int, int]:
    """``(max_num_seqs, max_model_len)`` for the flags the user left out: the given ones are kept,
    a missing batch is 8 (the largest up to 32 that fits when only the length is given), a missing
    length the longest multiple of 1024 that fits (of 128 when not even 1024 does)."""
    machine = _instance(instance)
    free = _shape_free(validate_overrides(overrides or {}))

    def fits(seqs: int, length: int) -> bool:
        try:
            return _configure(cfg, machine, tp, seqs, length, free)[3].headroom >= 0
        except OverrideError:
            return False

    if max_num_seqs is None and max_model_len is not None:
        seqs = _largest(lambda s: fits(s, max_model_len), 1, MAX_DEFAULT_SEQS)
        if seqs is None:
            raise PlanError(f"--max-model-len {max_model_len} does not fit even with --max-num-seqs 1 at "
                            f"--tensor-parallel-size {tp}; lower it (`kimi-neuron plan` shows the budget)")
        return seqs, max_model_len
    seqs = max_num_seqs if max_num_seqs is not None else DEFAULT_MAX_NUM_SEQS
    if max_model_len is not None:
        return seqs, max_model_len
    top = cfg.max_position_embeddings
    for step in (LENGTH_STEP, 128):
        n = _largest(lambda k, step=step: fits(seqs, k * step), 1, top // step)
        if n is not None:
            return seqs, n * step
    raise PlanError(f"--max-num-seqs {seqs} does not fit at any --max-model-len at --tensor-parallel-size "
                    f"{tp}; lower --max-num-seqs or raise --tensor-parallel-size")


def make_plan(cfg: KimiConfig, instance: str, tp: int, max_num_seqs: int, max_model_len: int,
              overrides: Mapping[str, Any] | None = None, model: str = DEFAULT_MODEL) -> Plan:
    """The deployment for ``vllm serve MODEL --tensor-parallel-size tp --max-num-seqs
    max_num_seqs --max-model-len max_model_len`` with the user's ``override_neuron_config``."""
    machine = _instance(instance)
    for flag, value in (("--tensor-parallel-size", tp), ("--max-num-seqs", max_num_seqs),
                        ("--max-model-len", max_model_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PlanError(f"{flag} must be a positive integer, got {value!r}")
    if max_model_len > cfg.max_position_embeddings:
        raise PlanError(f"--max-model-len {max_model_len} exceeds the model's max_position_embeddings "
                        f"{cfg.max_position_embeddings}")
    user = validate_overrides(overrides or {})
    layout, nc, warnings, b = _configure(cfg, machine, tp, max_num_seqs, max_model_len, user)
    if b.headroom < 0:
        raise _refusal(cfg, machine, tp, max_num_seqs, max_model_len, user, layout, b)
    patches, notes = _decode_notes(cfg, layout, b, max_num_seqs)
    return Plan(model=model, instance=machine.name, tp=tp, max_num_seqs=max_num_seqs,
                max_model_len=max_model_len, layout=layout, neuron_config=nc, budget=b, patches=patches,
                notes=[*notes, *_kernel_notes(cfg, layout), *warnings])
