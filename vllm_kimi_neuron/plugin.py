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

from . import __version__

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
    from .patches import SAMPLER_ENV, install, sampler_choice

    sampler = sampler_choice()  # an invalid KIMI_NEURON_SAMPLER stops vLLM here, with the fix
    mode = detect_mode()
    _registered_mode = mode
    # Patches apply when their module is imported: vLLM's CPU model runner, vllm-neuron's runner.
    install()
    if mode == "neuron":
        detail = "vllm-neuron found; Kimi-K2 Neuron model hooks are not implemented in this version yet"
    else:
        detail = "vllm-neuron not installed; no Neuron hooks"
    if sampler == "kimi":
        which = (f"sampler=kimi (the host sampler replaces vLLM's in the CPU and vllm-neuron model "
                 f"runners; {SAMPLER_ENV}=stock keeps vLLM's)")
    else:
        which = f"sampler=stock ({SAMPLER_ENV}=stock: vLLM's own sampler)"
    line = f"{LOG_PREFIX} {__version__} registered in pid {os.getpid()}: mode={mode} ({detail}); {which}"
    if logger.hasHandlers():
        logger.info(line)
    else:
        # vLLM configures its logging lazily; the API server loads plugins before that happens.
        print(f"INFO {line}", file=sys.stderr, flush=True)
    return mode
