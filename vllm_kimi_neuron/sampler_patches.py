"""The patches that put the host sampler (``sampling.py``) into vLLM's model runners.

Cheap to import (the plugin's ``register()`` does, in every vLLM process): the sampler and vLLM
are imported only when a patch applies, that is when vLLM imports the runner's module. Each entry
checks, before changing anything, every line of vLLM whose semantics the host sampler reproduces,
and that vLLM's CPU sampling kernel still draws what the sampler computes; otherwise it refuses
(and ``KIMI_NEURON_SAMPLER=stock`` runs vLLM's own sampler meanwhile).
"""

from __future__ import annotations

import functools
import os
from types import ModuleType
from typing import Any

from .patches import Expect, Patch, expecting

SAMPLER_ENV = "KIMI_NEURON_SAMPLER"
SAMPLER_CHOICES = ("kimi", "stock")
CPU_RUNNER = "vllm.v1.worker.cpu_model_runner"
NEURON_RUNNER = "vllm_neuron.worker.neuronx_distributed_model_runner"
NEURON_RUNNER_CLASS = "NeuronxDistributedModelRunner"
HINT = f" ({SAMPLER_ENV}=stock runs vLLM's own sampler instead)"


def sampler_choice() -> str:
    """The sampler ``KIMI_NEURON_SAMPLER`` selects: ``kimi`` (default) or ``stock`` (vLLM's own)."""
    raw = os.environ.get(SAMPLER_ENV, "")
    value = raw.strip().lower() or "kimi"
    if value not in SAMPLER_CHOICES:
        raise ValueError(f"{SAMPLER_ENV}={raw!r} is not valid: set it to 'kimi' (this package's host "
                         "sampler, the default) or 'stock' (vLLM's own sampler)")
    return value


def _wrap_init(cls: type, attr: str, runner: str) -> None:
    """After ``cls.__init__``, the runner's stock sampler in ``attr`` is replaced by the host sampler."""
    original = cls.__init__
    if getattr(original, "kimi_neuron_wrapped", False):
        return

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        from .sampling import host_sampler_for

        setattr(self, attr, host_sampler_for(getattr(self, attr), runner))

    __init__.kimi_neuron_wrapped = True  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[misc]


def _into_cpu_runner(module: ModuleType) -> None:
    _wrap_init(module.CPUModelRunner, "sampler", "vLLM's CPUModelRunner")


def _into_neuron_runner(module: ModuleType) -> None:
    runner = getattr(module, NEURON_RUNNER_CLASS)
    _wrap_init(runner, "cpu_sampler", f"vllm-neuron's {NEURON_RUNNER_CLASS}")

    def _apply_grammar_bitmask_from_output(self: Any, logits: Any, grammar_output: Any) -> Any:
        from .sampling import apply_grammar_output

        return apply_grammar_output(logits, grammar_output, self.input_batch.req_ids)

    runner._apply_grammar_bitmask_from_output = _apply_grammar_bitmask_from_output


def _kernel_agrees() -> str | None:
    from .sampling import kernel_agrees

    return "; ".join(kernel_agrees()) or None


_SAMPLER = "vllm.v1.sample.sampler"
_BUILTIN = "vllm.v1.sample.logits_processor.builtin"
FORWARD = ("self", "logits", "sampling_metadata", "predict_bonus_token", "logprobs_mode_override")
METADATA_FIELDS = ("temperature", "all_greedy", "all_random", "top_p", "top_k", "generators",
                   "max_num_logprobs", "no_penalties", "prompt_token_ids", "frequency_penalties",
                   "presence_penalties", "repetition_penalties", "output_token_ids",
                   "allowed_token_ids_mask", "bad_words_token_ids", "logitsprocs")
_COMMON = (
    Expect(_SAMPLER, "Sampler.forward", params=FORWARD),
    Expect(_SAMPLER, "Sampler.gather_logprobs", params=("logprobs", "num_logprobs", "token_ids")),
    Expect("vllm.v1.sample.metadata", "SamplingMetadata", has=METADATA_FIELDS),
    Expect("vllm.v1.sample.logits_processor", "LogitsProcessors", has=("all",),
           source=("self.argmax_invariant", "self.non_argmax_invariant")),
    Expect(_BUILTIN, "MinPLogitsProcessor", source=("self.min_p_count", "self.min_p")),
    Expect(_BUILTIN, "LogitBiasLogitsProcessor", source=("self.biases",)),
    Expect(_BUILTIN, "MinTokensLogitsProcessor", source=("self.min_toks",)),
)
# What the host sampler takes from vLLM 0.32 (CPU) as the definition of its semantics.
_VLLM_CPU_SEMANTICS = (
    *_COMMON,
    Expect(_SAMPLER, "Sampler.forward", source=("self.compute_logprobs(logits)",)),
    Expect(_SAMPLER, "Sampler.__init__", params=("self", "logprobs_mode", "use_fp64_gumbel")),
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
        "self.min_p: torch.Tensor", "max_probabilities.mul_(self.min_p)",
        "probability_values < adjusted_min_p")),
    Expect("vllm.model_executor.layers.utils", "apply_penalties", source=(
        "logits -= frequency_penalties.unsqueeze(dim=1) * output_bin_counts",
        "logits -= presence_penalties.unsqueeze(dim=1) * output_mask")),
    Expect("vllm._custom_ops", "apply_repetition_penalties_torch",
           source=("torch.where(logits > 0, 1.0 / penalties, penalties)",)),
)

CPU_RUNNER_PATCH = Patch(
    name="vllm-cpu-runner-host-sampler",
    distribution="vllm",
    versions=">=0.32,<0.33",
    module=CPU_RUNNER,
    why="the host sampler in place of vLLM's stock sampler in vLLM's CPU model runner",
    check=expecting(
        Expect(CPU_RUNNER, "CPUModelRunner.__init__", params=("self", "vllm_config", "device"),
               source=("super().__init__(vllm_config, device)",)),
        Expect("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.__init__",
               source=("self.sampler = Sampler(",)),
        *_VLLM_CPU_SEMANTICS, also=_kernel_agrees, hint=HINT),
    apply=_into_cpu_runner,
    diff="patches/vllm-0.32-cpu-model-runner-host-sampler.diff",
)

NEURON_RUNNER_PATCH = Patch(
    name="vllm-neuron-runner-host-sampler",
    distribution="vllm-neuron",
    versions=">=0.5.0,<0.6",
    module=NEURON_RUNNER,
    why="the host sampler as vllm-neuron's CPU sampler (on-device sampling off) and every grammar "
        "bitmask row applied at once",
    check=expecting(
        Expect(NEURON_RUNNER, f"{NEURON_RUNNER_CLASS}.__init__", params=("self", "vllm_config", "device"),
               source=("self.cpu_sampler = Sampler()",)),
        Expect(NEURON_RUNNER, f"{NEURON_RUNNER_CLASS}.sample_tokens", params=("self", "grammar_output"),
               source=("self._apply_grammar_bitmask_from_output(logits, grammar_output)",
                       "self.cpu_sampler(logits, sampling_metadata)")),
        Expect(NEURON_RUNNER, f"{NEURON_RUNNER_CLASS}._apply_grammar_bitmask_from_output",
               params=("self", "logits", "grammar_output")),
        # the bitmask is applied in place: the logits must be the runner's own copy
        Expect(NEURON_RUNNER, f"{NEURON_RUNNER_CLASS}._prepare_logits_for_sampling",
               params=("self", "hidden_states", "model_input"),
               source=("return hidden_states[reorder_indices]",)),
        Expect(NEURON_RUNNER, "Sampler"),
        *_COMMON, hint=HINT),
    apply=_into_neuron_runner,
    diff="patches/vllm-neuron-0.5-runner-host-sampler.diff",
)


def patches_for(mode: str) -> list[Patch]:
    """The sampler patches for a plugin mode (``neuron`` or ``inert``); none with the flag at stock."""
    if sampler_choice() == "stock":
        return []
    return [NEURON_RUNNER_PATCH] if mode == "neuron" else [CPU_RUNNER_PATCH]
