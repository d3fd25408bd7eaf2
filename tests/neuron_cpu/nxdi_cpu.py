"""Harness: our NxDI model executed by the real NxD 0.18 / NxDI 0.9 code in NxDI's CPU mode.

The model is built the way a device builds it, not the way ``to_cpu()`` does (which skips the
quantized-layer swap and silently drops FP8 scales, ../shared/neuron-sdk/README.md difference 1):

1. the planner's neuron_config (``make_plan``), with only the changes CPU mode forces
   (:data:`CPU_CHANGES`, each with its reason), becomes NxDI's ``MoENeuronConfig`` and our
   ``KimiK2InferenceConfig`` through NxDI's own ``load_pretrained_config``;
2. NxDI's ``shard_weights`` (what ``compile`` runs after tracing) shards the ``neuron-fp8``
   conversion with NxD's ``ModelBuilder.shard_checkpoint``: our ``checkpoint_loader_fn``, NxD's
   preshard hooks, dtype casting and per-rank slicing, written to ``weights/tp{rank}_...``; and
   ``InferenceConfig.save`` writes ``neuron_config.json`` as a compile does;
3. each rank (torchrun, gloo) builds every submodel with ``DecoderModelInstance.load_module()``
   (the device path: dtype casting and NxD's quantized expert layers) and loads its own shard file
   into it, where the device's runtime would load it into the traced graph;
4. NxDI's ``NeuronBaseForCausalLM.forward`` runs prefill and decode eagerly under
   ``torch.inference_mode()``, with NxDI's own KV-cache manager and its CPU-mode copy of the cache
   between the context-encoding and token-generation submodels.

The only other changes are the CPU-mode shims of :func:`install_cpu_shims`: one NxD CPU-mode bug
(FP8 indexing, difference 3) and three places where NxD's CPU mode falls short of the device path
with expert parallelism (difference 6). None touches the math; ``test_ep_shims.py`` proves the EP
ones against an unshimmed ep 1 run.

This module imports NxD/NxDI: it runs only in the Neuron-on-CPU environment
(``scripts/setup-neuron-cpu-env.sh``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# What NxD/NxDI and the stand-ins need on a host without devices (../shared/neuron-sdk/README.md,
# "Environment variables"). NXD_CPU_MODE is set only to execute: the sharding a compile does runs on
# the host without it on a device too (NxD's ModelBuilder mocks torch.distributed for it).
HOST_ENV = {"PJRT_DEVICE": "CPU", "NEURON_PLATFORM_TARGET_OVERRIDE": "trn2"}

# The changes CPU mode forces on the planner's neuron_config, and why (nothing else is changed).
CPU_CHANGES: dict[str, tuple[Any, str]] = {
    "torch_dtype": ("float32", "gloo has no bfloat16, and NxDI's CPU mode refuses bf16 at tp > 1 "
                               "(difference 4); fp32 everywhere also makes the comparison exact"),
    "enable_bucketing": (False, "CPU mode runs one module at every length (n_positions = seq_len), so "
                                "a bucket shorter than seq_len mismatches the causal mask (difference 2)"),
}

INSTANCE = "trn2.48xlarge"

# The serving shape of every run: 2 decode slots (continuous batching), and a context long enough
# that prefill takes NxD's dropless blockwise path as Kimi-K2's does (tokens * top_k >= NxD's
# block size 512; the tiny model routes each token to 2 experts).
MAX_NUM_SEQS = 2
MAX_MODEL_LEN = 256
# Two prompts of different lengths, then 4 teacher-forced decode steps (fixed tokens, so a top-1
# flip in one run cannot change the next step's inputs).
PROMPTS = [[5, 17, 300, 4000, 9], [11, 22, 33, 44, 55, 66, 77, 88, 99, 1000, 163586]]
DECODE = [[7, 8], [70, 80], [700, 800], [7000, 8000]]


@dataclass(frozen=True)
class Layout:
    """A parallel layout as the planner emits it for a real TP size, shrunk to fit 2 cores."""

    name: str
    tp: int
    overrides: dict[str, Any] = field(default_factory=dict)
    stands_for: str = ""

    @property
    def world(self) -> int:
        return self.tp * self.overrides.get("ep_degree", 1)


LAYOUTS = {
    "tp1": Layout("tp1", 1, stands_for="one rank: the whole model in one process"),
    "tp2": Layout("tp2", 2, stands_for="--tensor-parallel-size 64: tp_degree 64 x ep_degree 1"),
    "tp4": Layout("tp4", 4, stands_for="--tensor-parallel-size 64 with more ranks than heads per rank: "
                                       "one attention head per rank"),
    "tp2-moe-ep2": Layout("tp2-moe-ep2", 2, {"moe_tp_degree": 1, "moe_ep_degree": 2},
                          stands_for="--tensor-parallel-size 64 with override moe_ep_degree 2: expert "
                                     "parallelism inside the tensor-parallel world (ep_degree 1)"),
    "tp1-ep4": Layout("tp1-ep4", 1, {"ep_degree": 4},
                      stands_for="--tensor-parallel-size 16: tp_degree 16 x ep_degree 4 (world 64)"),
    "tp2-ep2": Layout("tp2-ep2", 2, {"ep_degree": 2},
                      stands_for="--tensor-parallel-size 32: tp_degree 32 x ep_degree 2, routed experts "
                                 "moe_tp_degree 32 x moe_ep_degree 2 (world 64)"),
}


def set_host_env() -> None:
    os.environ.update(HOST_ENV)


def neuron_config(model_dir: Path, converted: Path, layout: Layout, max_num_seqs: int,
                  max_model_len: int, cpu_changes: bool = True) -> tuple[dict[str, Any], list[str]]:
    """The planner's neuron_config for ``layout`` (with :data:`CPU_CHANGES` to execute it), and the
    plan's patches."""
    from vllm_kimi_neuron.config import KimiConfig
    from vllm_kimi_neuron.plan import make_plan

    plan = make_plan(KimiConfig.from_dir(model_dir), INSTANCE, layout.tp, max_num_seqs, max_model_len,
                     overrides=layout.overrides, model=str(model_dir))
    nc = {**plan.neuron_config, "quantized_checkpoints_path": str(converted)}
    if cpu_changes:
        nc.update({key: value for key, (value, _) in CPU_CHANGES.items()})
    return nc, plan.patches


def build_application(model_dir: Path, nc: dict[str, Any]) -> Any:
    """``NeuronKimiK2ForCausalLM`` with its config made by NxDI's own classes, as vllm-neuron does."""
    from vllm_kimi_neuron.neuron.hooks import register_kimi_hf_config
    from vllm_kimi_neuron.neuron.modeling import NeuronKimiK2ForCausalLM, inference_config

    register_kimi_hf_config()
    return NeuronKimiK2ForCausalLM(str(model_dir), inference_config(model_dir, nc))


def shard_like_compile(app: Any, compiled: Path) -> None:
    """What NxDI's ``compile`` does besides tracing: save ``neuron_config.json`` and pre-shard the
    weights into ``compiled/weights/`` with NxD's ``ModelBuilder.shard_checkpoint``."""
    compiled.mkdir(parents=True, exist_ok=True)
    app.config.save(str(compiled))
    app.shard_weights(str(compiled))


# -- CPU-mode shims (../shared/neuron-sdk/README.md differences 3 and 6) --------------------------

_GROUP_MESH: dict[int, list[list[int]]] = {}


class _Fp8Indexing(torch.overrides.TorchFunctionMode):
    """Index FP8 tensors through an int8 view: the same bytes, which CPU torch will not gather in
    FP8 ("index_cpu" not implemented for 'Float8_e4m3fn'); a device indexes them directly."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__ and args[0].dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            t = args[0]
            return t.view(torch.int8)[args[1]].view(t.dtype)
        return func(*args, **kwargs)


def install_cpu_shims() -> None:
    """Bridge what NxD's CPU mode cannot run as the device does. Each is a CPU-mode shim:
    process-group bookkeeping, byte-exact indexing or a fallback choice, never the arithmetic.

    (d) NxD CPU-mode bug: ``QuantizedExpertFusedColumnParallel.forward`` indexes the FP8 weight
        through int8 for CPU, then indexes it again in FP8, which CPU torch cannot do. Shim: that
        forward runs under :class:`_Fp8Indexing`.

    (a) ``new_group(ranks, pg_options={"xla_pg_options": {"mesh": mesh}})`` makes every group of the
        mesh at once on XLA; under gloo it makes only ``ranks`` and hands the other ranks a
        placeholder. Shim: create every group of the mesh (all ranks take part in each, as gloo
        requires) and return the one holding this rank.
    (b) ``get_expert_parallel_rank_from_global_rank`` reads ``group._mesh``, which only XLA groups
        carry. Shim: the mesh recorded by (a).
    (c) NxD's CPU fallback for dropless blockwise prefill computes each block's expert by index,
        which NxD refuses with expert parallelism ("Selective expert loading is not supported"). Shim:
        with EP, that fallback runs NxD's own ``forward_all_experts_EP`` (every local expert on
        every token, weighted by the same masked affinities: the same dropless result).
    """
    import torch.distributed as dist
    from neuronx_distributed.modules.moe import expert_mlps_v2
    from neuronx_distributed.parallel_layers import parallel_state
    from neuronx_distributed.quantization.quantization_layers import QuantizedExpertFusedColumnParallel

    if getattr(dist.new_group, "kimi_cpu_shim", False):
        return
    column_forward = QuantizedExpertFusedColumnParallel.forward

    def fp8_indexed_forward(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        with _Fp8Indexing():
            return column_forward(self, *args, **kwargs)

    QuantizedExpertFusedColumnParallel.forward = fp8_indexed_forward
    new_group = dist.new_group

    def mesh_new_group(ranks: Any = None, *args: Any, pg_options: Any = None, **kwargs: Any) -> Any:
        xla = pg_options.get("xla_pg_options", {}) if isinstance(pg_options, dict) else {}
        mesh = xla.get("mesh")
        if mesh is None:
            return new_group(ranks, *args, pg_options=pg_options, **kwargs)
        me, mine = dist.get_rank(), None
        for row in mesh:
            group = new_group(list(row), *args, **kwargs)
            if me in row:
                mine = group
        _GROUP_MESH[id(mine)] = [list(r) for r in mesh]
        return mine

    mesh_new_group.kimi_cpu_shim = True  # type: ignore[attr-defined]
    dist.new_group = mesh_new_group

    rank_from_global = parallel_state.get_expert_parallel_rank_from_global_rank

    def ep_rank_from_global(rank: int, expert_parallel_group: Any) -> int:
        mesh = getattr(expert_parallel_group, "_mesh", None) or _GROUP_MESH.get(id(expert_parallel_group))
        if mesh is None:
            return rank_from_global(rank, expert_parallel_group)
        return next(row.index(rank) for row in mesh if rank in row)

    parallel_state.get_expert_parallel_rank_from_global_rank = ep_rank_from_global

    blockwise = expert_mlps_v2.ExpertMLPsV2.forward_blockwise

    def forward_blockwise(self: Any, hidden_states: torch.Tensor, expert_affinities: torch.Tensor,
                          expert_index: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.moe_expert_model_parallel_group.size() > 1:
            return self.forward_all_experts_EP(hidden_states, expert_affinities, expert_index)
        return blockwise(self, hidden_states, expert_affinities, expert_index, *args, **kwargs)

    expert_mlps_v2.ExpertMLPsV2.forward_blockwise = forward_blockwise


# -- loading on each rank ------------------------------------------------------------------------

def init_ranks(nc: dict[str, Any]) -> int:
    """gloo process group and NxD's parallel state, as ``to_cpu()`` makes them; returns this rank."""
    import torch.distributed as dist
    from neuronx_distributed.parallel_layers.parallel_state import initialize_model_parallel

    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29511")
            dist.init_process_group("gloo", world_size=1, rank=0)
        else:
            dist.init_process_group("gloo")
    initialize_model_parallel(tensor_model_parallel_size=nc["tp_degree"], pipeline_model_parallel_size=1,
                              expert_model_parallel_size=nc.get("ep_degree", 1), skip_collective_init=True)
    return dist.get_rank()


def _device_module(wrapper: Any) -> Any:
    """A submodel as NxD's ModelBuilder.trace builds it: NxDI's ``DecoderModelInstance.load_module()``
    (dtype casting, quantized expert layers) in AOT mode, which skips initialising weights on the
    host (a shard replaces them), as CPU code would do per rank."""
    from neuronx_distributed.parallel_layers import parallel_state

    instance = wrapper.get_model_instance()
    parallel_state.set_aot_mode(True)
    try:
        instance.load_module()
    finally:
        parallel_state.set_aot_mode(False)
    return instance.module


def device_dtypes(app: Any) -> dict[str, dict[str, str]]:
    """Per submodel, the dtype of every parameter and buffer after the device path built it."""
    out = {}
    for wrapper in app.models:
        module = _device_module(wrapper)
        out[wrapper.tag] = {name: str(t.dtype).removeprefix("torch.")
                            for name, t in [*module.named_parameters(), *module.named_buffers()]}
    return out


def load_rank(app: Any, compiled: Path, rank: int) -> dict[str, list[str]]:
    """Every submodel built by NxDI's ``DecoderModelInstance.load_module()`` and loaded with this
    rank's shard as NxD wrote it; returns, per submodel, the module state the shard does not hold."""
    from safetensors.torch import load_file

    os.environ["NXD_CPU_MODE"] = "1"
    shard = load_file(str(compiled / "weights" / f"tp{rank}_sharded_checkpoint.safetensors"))
    missing: dict[str, list[str]] = {}
    for wrapper in app.models:
        module = _device_module(wrapper)
        result = module.load_state_dict(shard, strict=False)
        if result.unexpected_keys:
            raise AssertionError(f"{wrapper.tag}: the shard holds tensors the module lacks: "
                                 f"{result.unexpected_keys[:8]}")
        # In AOT mode NxD's parallel layers register their weight a second time as master_weight
        # (the same tensor): loaded with it.
        state = module.state_dict(keep_vars=True)
        missing[wrapper.tag] = [k for k in result.missing_keys if not (
            k.endswith(".master_weight") and state[k] is state[k.removesuffix("master_weight") + "weight"])]
        wrapper.model = module
    app.eval()
    return missing


@dataclass(frozen=True)
class Script:
    """What to run: prompts prefilled one at a time into slots 0.., then teacher-forced batched decode."""

    prompts: list[list[int]]
    decode: list[list[int]]  # [steps][sequence]: the token each sequence feeds at each step

    def to_json(self) -> str:
        return json.dumps({"prompts": self.prompts, "decode": self.decode})

    @classmethod
    def from_json(cls, text: str) -> Script:
        raw = json.loads(text)
        return cls(raw["prompts"], raw["decode"])


def run_script(app: Any, script: Script) -> dict[str, torch.Tensor]:
    """Logits of every prompt's last position (prefill) and of every decode step, through NxDI's
    ``forward`` as vllm-neuron's runner calls it for continuous batching: one prompt per prefill in
    its own slot, no attention mask (NxDI infers it from the positions), the batch decoded at each
    sequence's own position."""
    out: dict[str, torch.Tensor] = {}
    lengths = [len(p) for p in script.prompts]
    with torch.inference_mode():
        for slot, prompt in enumerate(script.prompts):
            res = app.forward(input_ids=torch.tensor([prompt]), seq_ids=torch.tensor([slot]),
                              attention_mask=None, position_ids=torch.arange(len(prompt))[None],
                              sampling_params=_sampling_params(1))
            out[f"prefill{slot}"] = res.logits[0, -1].float().clone()
        batch = len(script.prompts)
        for step, tokens in enumerate(script.decode):
            res = app.forward(input_ids=torch.tensor(tokens)[:, None], seq_ids=torch.arange(batch),
                              attention_mask=None, position_ids=torch.tensor([[n + step] for n in lengths]),
                              sampling_params=_sampling_params(batch))
            out[f"decode{step}"] = res.logits[:, -1].float().clone()
    return out


def _sampling_params(batch: int) -> torch.Tensor:
    # top_k, top_p, temperature per sequence, as vllm-neuron sends them (unused with CPU sampling).
    return torch.tensor([[1.0, 1.0, 1.0]]).repeat(batch, 1)
