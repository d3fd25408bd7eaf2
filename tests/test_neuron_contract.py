"""Static contract of our Neuron-facing source against the upstream API manifests.

The Neuron SDK cannot be installed here, so ``vllm_kimi_neuron/neuron/`` is parsed, not imported,
and every upstream name it imports, every keyword argument it passes to an upstream callable, every
upstream method it overrides and every ``neuron_config`` attribute it reads is looked up in the
manifests of NxDI 0.9, NxD (SDK 2.29) and vllm-neuron 0.5.0 (tests/upstream_api/).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from vllm_kimi_neuron.neuron import hooks

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "vllm_kimi_neuron" / "neuron").glob("*.py"))
MANIFEST_DIR = Path(__file__).parent / "upstream_api"
WORKSPACE_COPY = ROOT.parent / "shared" / "upstream-api"
UPSTREAM = ("neuronx_distributed_inference", "neuronx_distributed", "vllm_neuron")
MODULES: dict[str, dict[str, Any]] = {}
for _f in ("nxdi.json", "nxd.json", "vllm_neuron.json"):
    MODULES.update(json.loads((MANIFEST_DIR / _f).read_text())["modules"])


def _is_upstream(module: str) -> bool:
    return module.split(".")[0] in UPSTREAM


def _lookup(module: str, name: str) -> tuple[str, dict[str, Any] | None]:
    """(kind, entry) of ``module.name`` following re-exports; kind "" when absent."""
    info = MODULES.get(module)
    if info is None:
        return "", None
    for kind in ("classes", "functions"):
        if name in info.get(kind, {}):
            return kind, info[kind][name]
    if name in info.get("constants", {}):
        return "constants", None
    if name in info.get("imports", {}):
        src_module, src_name = info["imports"][name].split(":")
        return _lookup(src_module, src_name) if src_module in MODULES else ("imports", None)
    return "", None


def _imports(tree: ast.Module) -> dict[str, tuple[str, str]]:
    """Local name -> (upstream module, name) for every upstream ``from X import Y``."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and _is_upstream(node.module):
            for alias in node.names:
                out[alias.asname or alias.name] = (node.module, alias.name)
    return out


def _params(entry: dict[str, Any]) -> tuple[set[str], bool]:
    names = {p["name"] for p in entry["params"] if p["kind"] in ("positional", "keyword_only")}
    names |= set(entry.get("kwargs_keys", {}))
    return names - {"self", "cls"}, any(p["kind"] == "var_keyword" for p in entry["params"])


def _class_chain(module: str, name: str) -> list[dict[str, Any]]:
    """The class and its upstream bases (resolved through the same module's imports)."""
    kind, entry = _lookup(module, name)
    if kind != "classes" or entry is None:
        return []
    chain = [entry]
    for base in entry["bases"]:
        base_name = base.split(".")[-1]
        base_module = module
        info = MODULES.get(module, {})
        if base_name in info.get("imports", {}):
            base_module, base_name = info["imports"][base_name].split(":")
        elif base_name not in info.get("classes", {}):
            src = next((m for m, i in MODULES.items() if base_name in i.get("classes", {})), None)
            if src is None:
                continue
            base_module = src
        chain += _class_chain(base_module, base_name)
    return chain


def _sources() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text())) for p in SOURCES]


def test_manifest_copies_match_the_workspace() -> None:
    if not WORKSPACE_COPY.exists():
        pytest.skip(f"{WORKSPACE_COPY} is not here (outside the development workspace)")
    for f in WORKSPACE_COPY.glob("*.json"):
        assert (MANIFEST_DIR / f.name).read_bytes() == f.read_bytes(), f.name


def test_every_upstream_import_exists() -> None:
    missing = []
    for path, tree in _sources():
        for local, (module, name) in _imports(tree).items():
            if module not in MODULES:
                missing.append(f"{path.name}: module {module} (for {local}) is not in the manifests")
            elif not _lookup(module, name)[0]:
                missing.append(f"{path.name}: {module} has no {name}")
    assert not missing, "\n".join(missing)
    assert any(_imports(t) for _, t in _sources())  # the test saw the imports it is meant to check


def test_keyword_arguments_of_upstream_calls_exist() -> None:
    problems, checked = [], 0
    for path, tree in _sources():
        imported = _imports(tree)
        bases = {c.name: [b.id for b in c.bases if isinstance(b, ast.Name)]
                 for c in ast.walk(tree) if isinstance(c, ast.ClassDef)}
        for cls in (c for c in ast.walk(tree) if isinstance(c, ast.ClassDef)):
            for call in (n for n in ast.walk(cls) if isinstance(n, ast.Call)):
                func = call.func
                if isinstance(func, ast.Name) and func.id in imported:
                    module, name = imported[func.id]
                    method = "__init__"
                elif (isinstance(func, ast.Attribute) and func.attr == "__init__"
                      and isinstance(func.value, ast.Call) and getattr(func.value.func, "id", "") == "super"):
                    upstream = [b for b in bases[cls.name] if b in imported]
                    if not upstream:
                        continue
                    module, name = imported[upstream[0]]
                    method = "__init__"
                else:
                    continue
                kind, entry = _lookup(module, name)
                if kind == "classes" and entry is not None:
                    entry = next((c["methods"][method] for c in _class_chain(module, name)
                                  if method in c["methods"]), None)
                if entry is None:
                    problems.append(f"{path.name}: cannot find the signature of {module}.{name}")
                    continue
                accepted, open_kwargs = _params(entry)
                for kw in call.keywords:
                    checked += 1
                    if kw.arg is not None and kw.arg not in accepted and not open_kwargs:
                        problems.append(f"{path.name}:{call.lineno}: {name}() takes no keyword {kw.arg!r}")
    assert not problems, "\n".join(problems)
    assert checked > 20


# Methods of our subclasses that are ours alone (everything else must override something upstream),
# and classes only our own code constructs (their __init__ need not take upstream's parameters).
OWN_METHODS = {"_weights"}
# torch.nn.Module methods the model overrides (torch is not in the NxD/NxDI manifests): checked
# against the installed torch.
TORCH_MODULE_METHODS = {"_apply"}
CONSTRUCTED_BY_US = {"KimiRouter"}


def test_overridden_methods_exist_upstream_with_compatible_parameters() -> None:
    problems, overrides = [], 0
    for path, tree in _sources():
        imported = _imports(tree)
        for cls in (c for c in ast.walk(tree) if isinstance(c, ast.ClassDef)):
            upstream = [imported[b.id] for b in cls.bases if isinstance(b, ast.Name) and b.id in imported]
            if not upstream:
                continue
            chain = [c for module, name in upstream for c in _class_chain(module, name)]
            for fn in (n for n in cls.body if isinstance(n, ast.FunctionDef)):
                theirs = next((c["methods"][fn.name] for c in chain if fn.name in c["methods"]), None)
                if theirs is None and fn.name in TORCH_MODULE_METHODS:
                    import inspect

                    import torch

                    ours = [a.arg for a in fn.args.args]
                    if ours != list(inspect.signature(getattr(torch.nn.Module, fn.name)).parameters):
                        problems.append(f"{path.name}: {cls.name}.{fn.name} takes {ours}, not torch's")
                    continue
                if theirs is None:
                    if fn.name not in OWN_METHODS:
                        problems.append(f"{path.name}: {cls.name}.{fn.name} overrides nothing upstream")
                    continue
                overrides += 1
                if fn.name == "__init__" and cls.name in CONSTRUCTED_BY_US:
                    continue
                ours = [a.arg for a in fn.args.args + fn.args.kwonlyargs]
                needed = [p["name"] for p in theirs["params"] if p["kind"] == "positional"]
                # Every positional parameter upstream passes must be accepted by name or position.
                if len(ours) < len(needed) and fn.args.vararg is None and fn.args.kwarg is None:
                    problems.append(f"{path.name}: {cls.name}.{fn.name}{tuple(ours)} takes fewer "
                                    f"parameters than upstream {tuple(needed)}")
    assert not problems, "\n".join(problems)
    assert overrides >= 12


def test_neuron_config_attributes_read_exist() -> None:
    known: set[str] = set()
    for cls in ("NeuronConfig", "MoENeuronConfig"):
        entry = MODULES["neuronx_distributed_inference.models.config"]["classes"][cls]
        init = entry["methods"]["__init__"]
        known |= set(entry.get("instance_attributes", [])) | set(init.get("kwargs_keys", {}))
        known |= {p["name"] for p in init["params"]}
    read = set()
    for _, tree in _sources():
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                    and node.value.attr == "neuron_config"):
                read.add(node.attr)
    assert read, "no neuron_config attributes found: the parser missed them"
    assert read <= known, sorted(read - known)


def test_patch_targets_match_the_manifests() -> None:
    loader = MODULES[hooks.LOADER]
    assert {"get_neuron_model", "_get_neuron_model_cls"} <= set(loader["functions"])
    assert loader["imports"]["MODEL_TYPES"] == "neuronx_distributed_inference.utils.constants:MODEL_TYPES"
    upstream = [p["name"] for p in loader["functions"]["get_neuron_model"]["params"]]
    ours = hooks.get_neuron_model_parameters()
    assert ours == upstream, "the wrapper must take vllm-neuron's parameters in its order"
    runner = MODULES[hooks.RUNNER]
    assert runner["imports"]["get_neuron_model"] == f"{hooks.LOADER}:get_neuron_model"
    model_utils = MODULES[hooks.THRESHOLD_MODULES[0]]
    assert model_utils["constants"]["DEFAULT_SELECTIVE_LOADING_THRESHOLD"] == "1.0"
    for module in hooks.THRESHOLD_MODULES[1:]:
        assert MODULES[module]["imports"]["DEFAULT_SELECTIVE_LOADING_THRESHOLD"].endswith(
            "model_utils:DEFAULT_SELECTIVE_LOADING_THRESHOLD"), module


def _module_like_manifest(name: str) -> ModuleType:
    """Test double for an upstream module we cannot install: an empty module carrying the names
    the manifest lists, with placeholder values."""
    module = ModuleType(name)
    info = MODULES[name]
    for attr in [*info.get("functions", {}), *info.get("classes", {}), *info.get("imports", {})]:
        setattr(module, attr, lambda *a, **k: None)
    for attr, text in info.get("constants", {}).items():
        setattr(module, attr, float(text) if text.replace(".", "", 1).isdigit() else text)
    return module


def test_patch_checks_accept_the_manifest_shape_and_refuse_others() -> None:
    loader = _module_like_manifest(hooks.LOADER)
    loader.MODEL_TYPES = {}
    assert hooks.PATCHES[0].check(loader) is None
    del loader._get_neuron_model_cls
    assert "_get_neuron_model_cls" in (hooks.PATCHES[0].check(loader) or "")
    for patch in hooks.SELECTIVE_LOADING:
        module = _module_like_manifest(patch.module)
        if not hasattr(module, "DEFAULT_SELECTIVE_LOADING_THRESHOLD") or callable(
                module.DEFAULT_SELECTIVE_LOADING_THRESHOLD):
            module.DEFAULT_SELECTIVE_LOADING_THRESHOLD = 1.0  # imported by name: the value is model_utils'
        assert patch.check(module) is None, patch.name
        patch.apply(module)
        assert module.DEFAULT_SELECTIVE_LOADING_THRESHOLD == 0.0
        assert "0.0" in (patch.check(module) or "")  # a second application refuses
