"""The patch registry: checks before applying, refusals, the import hook, the on-disk twins, and
the vllm-neuron entry against vllm-neuron 0.5.0's name/signature manifest."""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
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

from vllm_kimi_neuron import patches
from vllm_kimi_neuron.patches import PATCHES, Expect, Patch, PatchError
from vllm_kimi_neuron.sampling import host_sampler_for, vllm_batch

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = Path(__file__).parent / "upstream-api"
CPU_ENTRY = next(p for p in PATCHES if p.name == "vllm-cpu-runner-host-sampler")
NEURON_ENTRY = next(p for p in PATCHES if p.name == "vllm-neuron-runner-host-sampler")


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[patches._ImportHook]:
    """A fresh registry state and import hook, taken out of sys.meta_path again afterwards."""
    monkeypatch.setattr(patches, "STATUS", {})
    hook = patches._ImportHook()
    monkeypatch.setattr(patches, "_hook", hook)
    yield hook
    if hook in sys.meta_path:
        sys.meta_path.remove(hook)


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_sampler_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(patches.SAMPLER_ENV, raising=False)
    assert patches.sampler_choice() == "kimi"
    monkeypatch.setenv(patches.SAMPLER_ENV, " Stock ")
    assert patches.sampler_choice() == "stock"
    monkeypatch.setenv(patches.SAMPLER_ENV, "fast")
    with pytest.raises(ValueError, match=r"KIMI_NEURON_SAMPLER='fast' is not valid: set it to 'kimi'"):
        patches.sampler_choice()


def test_every_entry_has_its_twin_on_disk_and_the_other_way_round() -> None:
    names = [p.name for p in PATCHES]
    assert len(set(names)) == len(names)
    readme = (ROOT / "patches" / "README.md").read_text()
    assert {p.diff for p in PATCHES} == {f.name for f in (ROOT / "patches").glob("*.diff")}
    for p in PATCHES:
        assert p.versions[0] < p.versions[1] and p.name in readme and p.diff in readme


def test_the_cpu_entry_accepts_the_installed_vllm() -> None:
    # vllm-cpu 0.32: every name, signature, source line and the kernel's draws are as expected
    assert CPU_ENTRY.problems() == []


def _target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    (tmp_path / f"{name}.py").write_text("def hello(who):\n    return 'hello ' + who\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)


def _patch(name: str, **changes: object) -> Patch:
    base = Patch(name=f"test-{name}", summary="a test patch", distributions=("vllm",),
                 versions=((0, 32), (0, 33)), module=name, apply=lambda m: setattr(m, "patched", True),
                 expects=(Expect(name, "hello", params=("who",), source=("'hello ' + who",)),))
    return dataclasses.replace(base, **changes)


def test_a_patch_applies_when_its_module_is_imported(registry: patches._ImportHook, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    name = "kimi_patch_target_later"
    _target(tmp_path, monkeypatch, name)
    patch = _patch(name)
    assert patches.install([patch]) == {patch.name: f"waiting for {name} to be imported"}
    assert registry in sys.meta_path
    module = importlib.import_module(name)
    assert module.patched and module.hello("you") == "hello you"
    assert patches.STATUS[patch.name].startswith("applied (vllm 0.32")
    assert patches.install([patch])[patch.name].startswith("applied")  # idempotent
    monkeypatch.delitem(sys.modules, name)


REFUSALS = {
    "versions": (dict(versions=((0, 16), (0, 17))), "is not a version it was written for (>= 0.16, < 0.17)"),
    "distribution": (dict(distributions=("no-such-distribution",)), "none of the distributions"),
    "signature": (dict(expects=(Expect("MOD", "hello", params=("who", "greeting")),)),
                  "takes ('who',), not ('who', 'greeting')"),
    "source": (dict(expects=(Expect("MOD", "hello", source=("'hi ' + who",)),)), "no longer contains"),
    "missing": (dict(expects=(Expect("MOD", "goodbye"),)), "MOD.goodbye is missing"),
    "behaviour": (dict(selftest=lambda: ["the kernel draws differently"]), "the kernel draws differently"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_a_changed_target_is_refused_loudly(registry: patches._ImportHook, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    name = f"kimi_patch_target_{case}"
    _target(tmp_path, monkeypatch, name)
    module = importlib.import_module(name)
    change, reason = REFUSALS[case]
    change = {k: tuple(dataclasses.replace(e, module=name) for e in v) if k == "expects" else v
              for k, v in change.items()}
    reason = reason.replace("MOD", name)
    errors = _Errors()
    patches.logger.addHandler(errors)
    try:
        status = patches.install([_patch(name, **change)])
    finally:
        patches.logger.removeHandler(errors)
    assert status[f"test-{name}"].startswith("refused: ") and reason in status[f"test-{name}"]
    assert not hasattr(module, "patched")
    assert len(errors.lines) == 1 and reason in errors.lines[0] and "stays unpatched" in errors.lines[0]
    required = dataclasses.replace(_patch(name, **change), name="test-required", required=True)
    with pytest.raises(PatchError, match=r"update vllm_kimi_neuron/patches\.py"):
        patches.apply_patch(required, module)
    assert not hasattr(module, "patched")


def test_the_flag_turns_the_sampler_off(registry: patches._ImportHook,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(patches.SAMPLER_ENV, "stock")
    assert set(patches.install(PATCHES).values()) == {"disabled"}
    stock = Sampler()
    assert host_sampler_for(stock, "a test runner") is stock
    monkeypatch.setenv(patches.SAMPLER_ENV, "kimi")
    ours = host_sampler_for(Sampler(logprobs_mode="raw_logits"), "a test runner")
    assert type(ours).__name__ == "KimiSampler" and isinstance(ours, Sampler)
    assert ours.logprobs_mode == "raw_logits"


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)


def test_registering_patches_vllms_cpu_runner_when_it_is_imported() -> None:
    run = _python("import vllm_kimi_neuron.plugin as p; p.register()\n"
                  "import vllm.v1.worker.cpu_model_runner as m\n"
                  "from vllm_kimi_neuron.patches import STATUS\n"
                  "print(STATUS['vllm-cpu-runner-host-sampler'])\n"
                  "print(m.CPUModelRunner.__init__.__kimi_neuron_patched__)", KIMI_NEURON_SAMPLER="")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:2] == ["applied (vllm 0.32.0+cpu)", "True"]
    assert "sampler=kimi" in run.stderr


def test_registering_with_a_bad_flag_stops_with_the_fix() -> None:
    run = _python("import vllm_kimi_neuron.plugin as p; p.register()", KIMI_NEURON_SAMPLER="fast")
    assert run.returncode != 0 and "KIMI_NEURON_SAMPLER='fast' is not valid: set it to 'kimi'" in run.stderr
    run = _python("import vllm_kimi_neuron.plugin as p; p.register()", KIMI_NEURON_SAMPLER="stock")
    assert run.returncode == 0 and "sampler=stock" in run.stderr


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to apply the diff")
def test_the_vllm_diff_applies_to_the_installed_vllm(tmp_path: Path) -> None:
    import vllm.v1.worker.cpu_model_runner as upstream

    target = tmp_path / "vllm" / "v1" / "worker" / "cpu_model_runner.py"
    target.parent.mkdir(parents=True)
    shutil.copy(upstream.__file__, target)
    subprocess.run(["git", "apply", str(ROOT / "patches" / CPU_ENTRY.diff)], cwd=tmp_path, check=True)
    text = target.read_text()
    compile(text, str(target), "exec")
    assert 'self.sampler = host_sampler_for(self.sampler, "vLLM\'s CPUModelRunner")' in text


def _manifest_modules() -> dict:
    modules: dict = {}
    for name in ("vllm_neuron.json", "vllm_0_16.json"):
        modules.update(json.loads((MANIFESTS / name).read_text())["modules"])
    return modules


def test_the_neuron_entry_matches_the_vllm_neuron_0_5_and_vllm_0_16_manifests() -> None:
    # vllm-neuron needs the Neuron SDK and cannot be installed here: check the names it relies on
    modules = _manifest_modules()
    not_listed = set()
    for expect in NEURON_ENTRY.expects:
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
    # vLLM's built-in logits processors are not in the manifests: they are checked when applied
    assert not_listed == {"vllm.v1.sample.logits_processor.builtin", "vllm.v1.sample.logits_processor"}
    runner_module = modules[patches._NEURON_RUNNER]
    runner = runner_module["classes"][patches._NEURON_CLASS]
    assert {"cpu_sampler", "input_batch"} <= set(runner["instance_attributes"])
    assert runner_module["imports"]["Sampler"] == "vllm.v1.sample.sampler:Sampler"
    # the on-disk twin changes exactly the lines the entry checks for
    diff = (ROOT / "patches" / NEURON_ENTRY.diff).read_text()
    removed = [line[1:].strip() for line in diff.splitlines()
               if line.startswith("-") and not line.startswith("---")]
    assert removed == ["self.cpu_sampler = Sampler()",
                       "logits = self._apply_grammar_bitmask_from_output(logits, grammar_output)"]
    sources = [s for e in NEURON_ENTRY.expects for s in e.source]
    assert all(any(s in line for s in sources) for line in removed)
    assert "+++ b/vllm_neuron/worker/neuronx_distributed_model_runner.py" in diff


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


def test_the_neuron_entry_on_a_stand_in_runner(registry: patches._ImportHook, tmp_path: Path,
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
    monkeypatch.delenv(patches.SAMPLER_ENV, raising=False)
    try:
        _exercise_the_stand_in()
    finally:
        for name in [m for m in sys.modules if m.startswith("vllm_neuron")]:
            del sys.modules[name]


def _exercise_the_stand_in() -> None:
    assert patches.install([NEURON_ENTRY])[NEURON_ENTRY.name].startswith("waiting")
    module = importlib.import_module(patches._NEURON_RUNNER)
    assert patches.STATUS[NEURON_ENTRY.name] == "applied (vllm-neuron 0.5.0)"

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
