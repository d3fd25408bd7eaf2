"""Neuron mode: what ``register()`` installs in every vLLM process when vllm-neuron is importable.

Nothing here imports vllm-neuron, NxDI or NxD at registration time: each hook is a
:class:`~vllm_kimi_neuron.patches.Patch` applied when its target module is first imported, which
only happens in vLLM's engine-core process (vllm-neuron runs the worker there, with the "uni"
executor). The API server only gets the engine-ready timeout raised.

Flow inside the engine core, at ``get_neuron_model(...)``:
HF id -> local snapshot -> KimiConfig -> ``kimi-neuron`` plan (Kimi defaults under the user's
``override_neuron_config``, validated) -> neuron-fp8 conversion found (or made, resumably) ->
compiled-artifact directory chosen -> vllm-neuron's own loader with the merged config.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from ..patches import Patch
from ..plan import ENGINE_READY_TIMEOUT_S, PlanError

logger = logging.getLogger("vllm.kimi_neuron")

LOADER = "vllm_neuron.worker.neuronx_distributed_model_loader"
RUNNER = "vllm_neuron.worker.neuronx_distributed_model_runner"
# vllm-neuron builds the NxDI class key from the HF architecture: "DeepseekV3ForCausalLM" ->
# MODEL_TYPES["deepseekv3"]["causal-lm"]. The other two keys cover lookups by model_type.
MODEL_TYPE_KEYS = ("deepseekv3", "deepseek_v3", "kimi_k2")


def raise_engine_ready_timeout() -> str | None:
    """Raise ``VLLM_ENGINE_READY_TIMEOUT_S`` unless the user set it; returns the value set, if any."""
    if "VLLM_ENGINE_READY_TIMEOUT_S" in os.environ:
        return None
    os.environ["VLLM_ENGINE_READY_TIMEOUT_S"] = ENGINE_READY_TIMEOUT_S
    return ENGINE_READY_TIMEOUT_S


def _check_loader(module: ModuleType) -> str | None:
    for name in ("MODEL_TYPES", "get_neuron_model", "_get_neuron_model_cls"):
        if not hasattr(module, name):
            return f"it has no {name}"
    if not isinstance(module.MODEL_TYPES, dict):
        return f"MODEL_TYPES is a {type(module.MODEL_TYPES).__name__}, not a dict"
    return None


def register_model(module: ModuleType) -> None:
    from .modeling import NeuronKimiK2ForCausalLM

    register_kimi_hf_config()
    for key in MODEL_TYPE_KEYS:
        # In place: vllm-neuron imported this very dict object from NxDI's constants.
        module.MODEL_TYPES[key] = {"causal-lm": NeuronKimiK2ForCausalLM}
    module.get_neuron_model = _wrap_get_neuron_model(module.get_neuron_model)


def _wrap_get_neuron_model(original: Callable[..., Any]) -> Callable[..., Any]:
    def get_neuron_model(model_config: Any, cache_config: Any, parallel_config: Any, scheduler_config: Any,
                         lora_serving_config: Any, speculative_config: Any = None,
                         additional_config: Any = None) -> Any:
        additional = prepare_kimi(model_config, parallel_config, scheduler_config, additional_config or {})
        return original(model_config, cache_config, parallel_config, scheduler_config, lora_serving_config,
                        speculative_config, additional)

    get_neuron_model.kimi_neuron_wrapped = True  # type: ignore[attr-defined]
    return get_neuron_model


def get_neuron_model_parameters() -> list[str]:
    """The wrapper's parameter names, which must be vllm-neuron's (checked by the contract test)."""
    return list(inspect.signature(_wrap_get_neuron_model(lambda *a: None)).parameters)


def _check_runner(module: ModuleType) -> str | None:
    if not hasattr(module, "get_neuron_model"):
        return "it has no get_neuron_model"
    loader = sys.modules.get(LOADER)
    if loader is None or not getattr(loader.get_neuron_model, "kimi_neuron_wrapped", False):
        return f"{LOADER} was not patched first"
    return None


def _rebind_runner(module: ModuleType) -> None:
    # The runner did `from loader import get_neuron_model`; make sure it holds the wrapper even if
    # it was imported before the loader patch ran.
    module.get_neuron_model = sys.modules[LOADER].get_neuron_model


def register_kimi_hf_config() -> None:
    """Make ``model_type: kimi_k2`` loadable by ``AutoConfig`` without remote code: NxDI's
    ``load_pretrained_config`` calls ``AutoConfig.from_pretrained(path)`` without trust_remote_code."""
    from transformers import AutoConfig, DeepseekV3Config
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if "kimi_k2" in CONFIG_MAPPING:
        return

    class KimiK2Config(DeepseekV3Config):
        model_type = "kimi_k2"

    AutoConfig.register("kimi_k2", KimiK2Config)


def prepare_kimi(model_config: Any, parallel_config: Any, scheduler_config: Any,
                 additional_config: dict[str, Any]) -> dict[str, Any]:
    """The engine-core side of a Kimi start: returns the additional_config to hand to vllm-neuron."""
    from .. import artifacts, startup
    from ..config import KimiConfig, resolve_model
    from ..convert import ensure_converted
    from ..overrides import validate_additional_config
    from ..plan import make_plan
    from .modeling import stored_neuron_config

    with startup.phase("resolving"):
        model_dir = resolve_model(model_config.model, getattr(model_config, "revision", None))
        model_config.model = str(model_dir)
        cfg = KimiConfig.from_dir(model_dir)
        user = validate_additional_config(additional_config)
        plan = make_plan(cfg, instance=detect_instance(), tp=parallel_config.tensor_parallel_size,
                         max_num_seqs=scheduler_config.max_num_seqs, max_model_len=model_config.max_model_len,
                         overrides=user, model=str(model_dir))
    with startup.phase("converting", unit="MiB") as p:
        converted = ensure_converted(
            model_dir, on_progress=lambda done, total: p.update(done=done >> 20, total=total >> 20))
    neuron_config = {**plan.neuron_config, "quantized_checkpoints_path": str(converted)}
    install_plan_patches(plan.patches)
    user_dir = os.environ.get("NEURON_COMPILED_ARTIFACTS")
    decision = artifacts.choose(artifacts_root(), revision_of(converted), neuron_config,
                                artifacts.package_versions(), Path(user_dir) if user_dir else None,
                                as_stored=stored_neuron_config(model_dir, neuron_config))
    os.environ["NEURON_COMPILED_ARTIFACTS"] = str(decision.directory)
    logger.info("vllm-kimi-neuron: %s", decision.note)
    return {**additional_config, "override_neuron_config": neuron_config}


def _hf_json(model: str, revision: str | None, filename: str) -> dict[str, Any] | None:
    """``filename`` (config.json, tokenizer_config.json) of ``model``: from the directory, else the
    Hugging Face cache or hub (vLLM fetches the same small files next); None when it cannot be had,
    so vLLM reports that in its own words."""
    import json

    path = Path(model).expanduser() / filename
    if not path.parent.is_dir():
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(model, filename, revision=revision))
        except Exception:  # any failure here (offline, no such repo or file) is vLLM's to report
            return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _check_tokenizer(engine_args: Any) -> None:
    """Kimi-K2's tokenizer is remote code (``tokenization_kimi.py`` over tiktoken): without
    ``--trust-remote-code`` vLLM fails late and obscurely; say so first, and never turn it on."""
    if engine_args.trust_remote_code or getattr(engine_args, "skip_tokenizer_init", False):
        return
    tokenizer = getattr(engine_args, "tokenizer", None) or engine_args.model
    auto_map = (_hf_json(tokenizer, getattr(engine_args, "tokenizer_revision", None),
                         "tokenizer_config.json") or {}).get("auto_map") or {}
    remote = auto_map.get("AutoTokenizer")
    if remote:
        name = remote[0] if isinstance(remote, list) else remote
        raise PlanError(f"{tokenizer}: its tokenizer is remote code ({name}, shipped in the checkpoint); "
                        "pass --trust-remote-code to run it (vllm-kimi-neuron never turns it on for you), "
                        "or --skip-tokenizer-init to serve token ids only")


# vLLM switches that give NxDI's block KV layout, which Kimi-K2's NxDI model does not support (one
# contiguous KV row per sequence; with the block layout NxDI's prefill passes a cache, which
# KimiAttention would take for decode). vLLM V1 turns prefix caching on by default.
BLOCK_KV_SWITCHES = (("enable_prefix_caching", "--enable-prefix-caching", "--no-enable-prefix-caching"),
                     ("enable_chunked_prefill", "--enable-chunked-prefill", "--no-enable-chunked-prefill"))


def fit_engine_args(engine_args: Any, instance: str | None = None) -> list[str]:
    """Make a Kimi-K2/DeepSeek-V3 serve startable before vLLM builds its config, so that
    ``vllm serve MODEL --tensor-parallel-size N`` needs nothing else; returns the log lines.

    * prefix caching and chunked prefill are turned off unless the user asked for them, and a user
      who did is refused with the reason (vllm-neuron would build NxDI's block KV layout from them);
    * ``--max-num-seqs`` / ``--max-model-len`` left out get the shape the planner chooses (vLLM's
      defaults, 262144 tokens and 128+ sequences, never fit in HBM); flags given are kept.

    Models this package does not serve are left alone."""
    from ..config import ARCHITECTURE, KimiConfig
    from ..overrides import validate_additional_config
    from ..plan import default_shape

    raw = _hf_json(engine_args.model, getattr(engine_args, "revision", None), "config.json")
    if raw is None or ARCHITECTURE not in (raw.get("architectures") or []):
        return []
    _check_tokenizer(engine_args)
    lines = []
    turned_off = []
    for attr, on, off in BLOCK_KV_SWITCHES:
        value = getattr(engine_args, attr)
        if value:
            raise PlanError(f"{on}: not supported for Kimi-K2 on Neuron: vllm-neuron would build NxDI's "
                            "block KV-cache layout, and this model keeps one contiguous KV row per sequence; "
                            f"leave the flag out (or pass {off})")
        if value is None:
            setattr(engine_args, attr, False)
            turned_off.append(off)
    if turned_off:
        lines.append(f"vllm-kimi-neuron: {' '.join(turned_off)} (Kimi-K2 on Neuron keeps one contiguous KV "
                     "row per sequence; vLLM's default would give NxDI's block KV layout)")
    if engine_args.max_num_seqs is not None and engine_args.max_model_len is not None:
        return lines
    cfg = KimiConfig.from_dict(raw, source=f"{engine_args.model}/config.json")
    user = validate_additional_config(engine_args.additional_config or {})
    given = {"--max-num-seqs": engine_args.max_num_seqs, "--max-model-len": engine_args.max_model_len}
    seqs, length = default_shape(cfg, instance or detect_instance(), engine_args.tensor_parallel_size,
                                 engine_args.max_num_seqs, engine_args.max_model_len,
                                 user.get("override_neuron_config"))
    engine_args.max_num_seqs, engine_args.max_model_len = seqs, length
    chosen = " ".join(f"{flag} {value}" for flag, value in
                      (("--max-num-seqs", seqs), ("--max-model-len", length)) if given[flag] is None)
    lines.append(f"vllm-kimi-neuron: {chosen} chosen by the planner (the longest context that fits in HBM "
                 f"at --tensor-parallel-size {engine_args.tensor_parallel_size}); pass the flags to choose "
                 "yourself")
    return lines


def _check_engine_args(module: ModuleType) -> str | None:
    import dataclasses

    cls = getattr(module, "EngineArgs", None)
    if cls is None or not dataclasses.is_dataclass(cls):
        return "it has no EngineArgs dataclass"
    if not callable(getattr(cls, "create_engine_config", None)):
        return "EngineArgs has no create_engine_config"
    missing = {"model", "revision", "tensor_parallel_size", "max_num_seqs", "max_model_len",
               "additional_config", *(attr for attr, _, _ in BLOCK_KV_SWITCHES)} - {
        f.name for f in dataclasses.fields(cls)}
    return f"EngineArgs has no field(s) {sorted(missing)}" if missing else None


def _wrap_create_engine_config(module: ModuleType) -> None:
    original = module.EngineArgs.create_engine_config

    @functools.wraps(original)
    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        for line in fit_engine_args(self):
            logger.info(line)
        return original(self, *args, **kwargs)

    module.EngineArgs.create_engine_config = create_engine_config


INSTANCE_ENV = "KIMI_NEURON_INSTANCE"


def detect_instance() -> str:
    """The EC2 instance type from the Neuron device count (16 devices: trn2.48xlarge), or
    ``KIMI_NEURON_INSTANCE`` where the devices cannot be counted (a container without them, a
    build host preparing a deployment, the Neuron-on-CPU tests)."""
    if os.environ.get(INSTANCE_ENV):
        return os.environ[INSTANCE_ENV]
    devices = sorted(Path("/dev").glob("neuron[0-9]*"))
    known = {16: "trn2.48xlarge", 1: "trn2.3xlarge"}
    return known.get(len(devices), f"unknown ({len(devices)} Neuron devices)")


def artifacts_root() -> Path:
    from ..config import cache_home

    return cache_home() / "compiled"


def revision_of(converted: Path) -> str:
    """The converted checkpoint's identity: the sha256 of its manifest (which lists every file's)."""
    import hashlib

    from .modeling import CONVERSION_MANIFEST

    return hashlib.sha256((converted / CONVERSION_MANIFEST).read_bytes()).hexdigest()


def _check_threshold_targets(module: ModuleType) -> str | None:
    value = getattr(module, "DEFAULT_SELECTIVE_LOADING_THRESHOLD", None)
    source = sys.modules.get(THRESHOLD_MODULES[0])
    if module.__name__ != THRESHOLD_MODULES[0] and value == 0.0 and source is not None and \
            source.DEFAULT_SELECTIVE_LOADING_THRESHOLD == 0.0:
        return None  # imported by name after model_utils was patched: it holds the patched value already
    if value != 1.0:
        return f"DEFAULT_SELECTIVE_LOADING_THRESHOLD is {value!r}, expected 1.0"
    return None


def _threshold_zero(module: ModuleType) -> None:
    module.DEFAULT_SELECTIVE_LOADING_THRESHOLD = 0.0


# NxD's expert modules import the threshold by name, so each copy of the global is patched.
THRESHOLD_MODULES = ("neuronx_distributed.modules.moe.model_utils",
                     "neuronx_distributed.modules.moe.expert_mlps_v2",
                     "neuronx_distributed.modules.moe.moe_fused_tkg")

SELECTIVE_LOADING = [
    Patch(
        name=f"selective-loading-threshold:{target.rsplit('.', 1)[1]}",
        distribution="neuronx-distributed",
        versions=">=0.18,<0.19",
        module=target,
        why="decode with expert parallelism below tkg_batch*top_k/experts = 1 would hit NxD's "
            "'Selective Loading with Expert parallelism is not supported'; 0.0 makes every decode step "
            "run all local experts",
        check=_check_threshold_targets,
        apply=_threshold_zero,
        diff="patches/neuronx-distributed-selective-loading-threshold.diff",
    )
    for target in THRESHOLD_MODULES
]

# Runs in the API server, where vLLM builds its config; no on-disk twin (see patches/README.md).
SERVE_SHAPE = Patch(
    name="vllm-engine-args-kimi-shape",
    distribution="vllm",
    versions=">=0.16,<0.33",
    module="vllm.engine.arg_utils",
    why="`vllm serve MODEL --tensor-parallel-size N` starts: prefix caching and chunked prefill off "
        "(refused if asked for), and without --max-num-seqs/--max-model-len a shape that fits in HBM "
        "(vLLM's defaults do not); flags the user gives are kept",
    check=_check_engine_args,
    apply=_wrap_create_engine_config,
    diff=None,
)


PATCHES = [
    Patch(
        name="vllm-neuron-kimi-model",
        distribution="vllm-neuron",
        versions=">=0.5.0,<0.6",
        module=LOADER,
        why="serve DeepseekV3ForCausalLM/kimi_k2 with the Kimi-K2 NxDI model, Kimi defaults merged "
            "under the user's override_neuron_config, converted weights and keyed compiled artifacts",
        check=_check_loader,
        apply=register_model,
        diff="patches/vllm-neuron-kimi-model.diff",
    ),
    Patch(
        name="vllm-neuron-runner-loader",
        distribution="vllm-neuron",
        versions=">=0.5.0,<0.6",
        module=RUNNER,
        why="the model runner calls the Kimi-aware get_neuron_model",
        check=_check_runner,
        apply=_rebind_runner,
        diff="patches/vllm-neuron-kimi-model.diff",
    ),
    SERVE_SHAPE,
]

PLAN_PATCHES = {"selective-loading-threshold": SELECTIVE_LOADING}


def install_plan_patches(names: list[str]) -> None:
    from ..patches import install

    for name in names:
        if name not in PLAN_PATCHES:
            raise ValueError(f"the plan asks for an unknown patch {name!r}; known: {sorted(PLAN_PATCHES)}")
        install(PLAN_PATCHES[name])
