"""The patch registry, on real modules written to a temporary directory and imported for real."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from vllm_kimi_neuron import patches
from vllm_kimi_neuron.neuron import hooks
from vllm_kimi_neuron.patches import Patch, PatchError, install
from vllm_kimi_neuron.plan import PlanError


@pytest.fixture()
def target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh module `kimi_patch_target_<n>` with THRESHOLD = 1.0, not yet imported."""
    name = f"kimi_patch_target_{len(list(tmp_path.parent.iterdir()))}_{tmp_path.name[-6:]}"
    (tmp_path / f"{name}.py").write_text("THRESHOLD = 1.0\n\ndef f():\n    return THRESHOLD\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(patches, "_applied", {})
    monkeypatch.setattr(patches, "_pending", {})
    yield name
    sys.modules.pop(name, None)


def _patch(module: str, versions: str = ">=2", expect: float = 1.0) -> Patch:
    def check(m: ModuleType) -> str | None:
        found = getattr(m, "THRESHOLD", None)
        return None if found == expect else f"THRESHOLD is {found}"

    def apply(m: ModuleType) -> None:
        m.THRESHOLD = 0.0

    # torch is installed everywhere the tests run; its version decides the range checks below.
    return Patch("test-threshold", "torch", versions, module, "test", check, apply)


def test_applied_when_the_target_is_imported_later(target: str) -> None:
    install([_patch(target)])
    assert target not in sys.modules and patches.applied() == []
    module = importlib.import_module(target)
    assert module.THRESHOLD == 0.0 and module.f() == 0.0
    assert patches.applied() == ["test-threshold"]


def test_applied_at_once_when_the_target_is_already_imported(target: str) -> None:
    module = importlib.import_module(target)
    install([_patch(target)])
    assert module.f() == 0.0


def test_a_target_that_looks_different_is_refused_and_left_alone(target: str) -> None:
    module = importlib.import_module(target)
    with pytest.raises(PatchError, match=r"refuses to change .*THRESHOLD is 1.0.*nothing was changed"):
        install([_patch(target, expect=2.0)])
    assert module.THRESHOLD == 1.0


def test_a_version_outside_the_range_is_refused(target: str) -> None:
    module = importlib.import_module(target)
    with pytest.raises(PatchError, match=r"written for torch<1\.0, but .* is installed"):
        install([_patch(target, versions="<1.0")])
    assert module.THRESHOLD == 1.0


def test_a_missing_distribution_is_refused(target: str) -> None:
    module = importlib.import_module(target)
    p = _patch(target)
    missing = Patch(p.name, "no-such-distribution-kimi", ">=0", p.module, p.why, p.check, p.apply)
    with pytest.raises(PatchError, match="no-such-distribution-kimi is not installed"):
        install([missing])
    assert module.THRESHOLD == 1.0


def test_every_registered_patch_has_its_on_disk_diff() -> None:
    root = Path(__file__).resolve().parents[1]
    for patch in [*hooks.PATCHES, *hooks.SELECTIVE_LOADING]:
        if patch is hooks.SERVE_SHAPE:
            continue  # it runs the planner inside vLLM: there is no package-free source edit to ship
        assert patch.diff is not None and (root / patch.diff).is_file(), patch.name
        text = (root / patch.diff).read_text()
        # One on-disk diff may stand for several run-time patches of the same package.
        assert text.startswith("--- a/" + patch.module.split(".")[0] + "/"), patch.name


def test_engine_ready_timeout_raised_only_when_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_ENGINE_READY_TIMEOUT_S", raising=False)
    assert hooks.raise_engine_ready_timeout() == hooks.ENGINE_READY_TIMEOUT_S
    monkeypatch.setenv("VLLM_ENGINE_READY_TIMEOUT_S", "900")
    assert hooks.raise_engine_ready_timeout() is None
    import os

    assert os.environ["VLLM_ENGINE_READY_TIMEOUT_S"] == "900"


def _model_dir(root: Path, raw: dict) -> Path:
    import json

    root.mkdir()
    (root / "config.json").write_text(json.dumps(raw))
    return root


def test_serve_shape_fills_only_the_flags_left_out_on_vllms_own_engine_args(tmp_path: Path) -> None:
    from vllm.engine.arg_utils import EngineArgs

    from vllm_kimi_neuron.config import KimiConfig
    from vllm_kimi_neuron.plan import default_shape

    module = importlib.import_module(hooks.SERVE_SHAPE.module)
    assert hooks.SERVE_SHAPE.check(module) is None  # the installed vLLM has what the hook uses
    kimi = _model_dir(tmp_path / "kimi", KimiConfig().to_dict())

    bare = EngineArgs(model=str(kimi), tensor_parallel_size=64)
    lines = hooks.fit_engine_args(bare, instance="trn2.48xlarge")
    chosen = default_shape(KimiConfig(), "trn2.48xlarge", 64, None, None)
    assert (bare.max_num_seqs, bare.max_model_len) == chosen
    assert f"--max-num-seqs 8 --max-model-len {bare.max_model_len} chosen" in lines[-1]
    # vLLM V1's default would turn prefix caching on, which vllm-neuron turns into NxDI's block KV layout
    assert (bare.enable_prefix_caching, bare.enable_chunked_prefill) == (False, False)
    assert "--no-enable-prefix-caching --no-enable-chunked-prefill" in lines[0]

    length_only = EngineArgs(model=str(kimi), tensor_parallel_size=64, max_model_len=8192)
    lines = hooks.fit_engine_args(length_only, instance="trn2.48xlarge")
    assert length_only.max_model_len == 8192 and "--max-model-len" not in lines[-1]

    given = EngineArgs(model=str(kimi), tensor_parallel_size=64, max_num_seqs=16, max_model_len=1024,
                       enable_prefix_caching=False, enable_chunked_prefill=False)
    assert hooks.fit_engine_args(given, instance="trn2.48xlarge") == []
    assert (given.max_num_seqs, given.max_model_len) == (16, 1024)

    for flag in ("enable_prefix_caching", "enable_chunked_prefill"):
        asked = EngineArgs(model=str(kimi), tensor_parallel_size=64, **{flag: True})
        refused = f"--{flag.replace('_', '-')}: not supported for Kimi-K2 on Neuron"
        with pytest.raises(PlanError, match=refused):
            hooks.fit_engine_args(asked, instance="trn2.48xlarge")

    llama = _model_dir(tmp_path / "llama", {"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    other = EngineArgs(model=str(llama), tensor_parallel_size=64)
    assert hooks.fit_engine_args(other, instance="trn2.48xlarge") == []
    assert other.max_num_seqs is None and other.enable_prefix_caching is None


def test_serve_shape_hook_runs_before_vllm_builds_its_config(tmp_path: Path) -> None:
    from vllm.engine.arg_utils import EngineArgs

    from vllm_kimi_neuron.config import KimiConfig

    class Recording(EngineArgs):  # stands in for the config build: records what it would be given
        def create_engine_config(self, *args: object, **kwargs: object) -> tuple[int | None, int | None]:
            return self.max_num_seqs, self.max_model_len

    module = ModuleType("arg_utils_under_test")
    module.EngineArgs = Recording
    hooks.SERVE_SHAPE.apply(module)
    kimi = _model_dir(tmp_path / "kimi", KimiConfig().to_dict())
    # No Neuron devices here: the instance is detected as unknown, which the planner refuses by name.
    with pytest.raises(ValueError, match="unknown instance type"):
        Recording(model=str(kimi), tensor_parallel_size=64).create_engine_config()
    assert Recording(model=str(kimi), tensor_parallel_size=64, max_num_seqs=8,
                     max_model_len=2048).create_engine_config() == (8, 2048)
