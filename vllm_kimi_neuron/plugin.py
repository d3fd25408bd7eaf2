"""The ``vllm.general_plugins`` entry point: runs once in every vLLM process.

vllm-neuron is already vLLM's platform plugin and vLLM refuses to start with two, so this package
hooks in as a *general* plugin instead. ``register()`` must be cheap (it runs in the API server,
the engine core and every worker), idempotent, and must never take vLLM down with it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from typing import Literal

from . import __version__, startup

Mode = Literal["neuron", "inert"]
LOG_PREFIX = "vllm-kimi-neuron"
# A child of vLLM's own logger, so the line is formatted and routed like vLLM's.
logger = logging.getLogger("vllm.kimi_neuron")

_registered_mode: Mode | None = None


def detect_mode() -> Mode:
    """``neuron`` when vllm-neuron is installed (found without importing it), else ``inert``."""
    return "neuron" if importlib.util.find_spec("vllm_neuron") is not None else "inert"


def register() -> Mode:
    """Install the hooks for this process's mode, once; later calls return the same mode."""
    global _registered_mode
    if _registered_mode is not None:
        return _registered_mode
    from .patches import install
    from .sampler_patches import SAMPLER_ENV, patches_for, sampler_choice

    sampler = sampler_choice()  # an invalid KIMI_NEURON_SAMPLER stops vLLM here, with the fix
    mode = detect_mode()
    _registered_mode = mode
    detail = _install_neuron_hooks() if mode == "neuron" else "vllm-neuron not installed; no hooks installed"
    # The host sampler goes into the model runner of this mode when vLLM imports it.
    install(patches_for(mode))
    if sampler == "kimi":
        runner = "vllm-neuron's" if mode == "neuron" else "vLLM's CPU"
        which = (f"sampler=kimi (the host sampler replaces vLLM's in {runner} model runner; "
                 f"{SAMPLER_ENV}=stock keeps vLLM's)")
    else:
        which = f"sampler=stock ({SAMPLER_ENV}=stock: vLLM's own sampler)"
    line = (f"{LOG_PREFIX} {__version__} registered in pid {os.getpid()}: mode={mode} ({detail}; "
            f"{startup.install()}); {which}")
    if logger.hasHandlers():
        logger.info(line)
    else:
        # vLLM configures its logging lazily; the API server loads plugins before that happens.
        print(f"INFO {line}", file=sys.stderr, flush=True)
    return mode


def _install_neuron_hooks() -> str:
    from .neuron import hooks
    from .patches import install

    install(hooks.PATCHES)
    # The API server builds vLLM's ModelConfig before any Neuron code runs: transformers 4.57 (what
    # vllm-neuron runs on) does not know model_type kimi_k2, and the bare command has no remote code.
    hooks.register_kimi_hf_config()
    raised = hooks.raise_engine_ready_timeout()
    timeout = (f"VLLM_ENGINE_READY_TIMEOUT_S raised to {raised} s" if raised
               else "VLLM_ENGINE_READY_TIMEOUT_S left as you set it")
    return f"vllm-neuron found; Kimi-K2 model hooks armed for its model loader; {timeout}"
