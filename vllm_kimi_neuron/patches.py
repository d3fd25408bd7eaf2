"""The one registry of runtime patches to upstream code.

Each :class:`Patch` names the distribution and version range it was written against, the module it
changes, a ``check`` that the target still looks the way the patch expects, and the on-disk diff
under ``patches/`` that image builders can apply instead. Installing a patch never guesses: a
version outside the range or a failed check raises :class:`PatchError` naming the patch, what was
found, and what to do. Patches are applied when their target module is imported (an import hook),
so registering them costs nothing in processes that never load the target.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import inspect
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

logger = logging.getLogger("vllm.kimi_neuron")


class PatchError(RuntimeError):
    """An upstream target that does not look the way a patch expects; nothing was changed."""


@dataclass(frozen=True)
class Patch:
    name: str
    distribution: str  # as pip knows it, e.g. "vllm-neuron"
    versions: str  # PEP 440 specifier the patch was checked against, e.g. ">=0.5.0,<0.6"
    module: str  # the module whose attributes are changed
    why: str
    check: Callable[[ModuleType], str | None]  # None if the target looks as expected, else why not
    apply: Callable[[ModuleType], None]
    diff: str | None = None  # the equivalent file under patches/, for image builders
    # Optional patches only add observability (startup progress): one that cannot apply is skipped
    # with a warning instead of stopping vLLM.
    optional: bool = False


@dataclass(frozen=True)
class Expect:
    """Something a patch relies on, for :func:`expecting`: ``qualname`` in ``module``, with exactly
    these parameters, these attributes (class attributes or dataclass fields) and these snippets in
    its source (which is how attributes set in ``__init__`` and behaviour are pinned down)."""

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


@dataclass(frozen=True)
class Expecting:
    """A :class:`Patch` ``check`` made of expectations: None when all hold, else every one that
    does not; then ``also`` (a behavioural check) runs. ``hint`` is appended to a failure."""

    expects: tuple[Expect, ...]
    also: Callable[[], str | None] | None = None
    hint: str = ""

    def __call__(self, module: ModuleType) -> str | None:
        problems = [p for e in self.expects for p in e.problems()]
        if not problems and self.also is not None and (extra := self.also()) is not None:
            problems.append(extra)
        return "; ".join(problems) + self.hint if problems else None


def expecting(*expects: Expect, also: Callable[[], str | None] | None = None, hint: str = "") -> Expecting:
    return Expecting(expects, also, hint)


_applied: dict[str, ModuleType] = {}
_pending: dict[str, list[Patch]] = {}


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_version(patch: Patch) -> None:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    found = _installed_version(patch.distribution)
    if found is None:
        raise PatchError(f"patch {patch.name!r}: {patch.distribution} is not installed")
    # A local suffix (e.g. "+neuron") does not change which upstream release this is.
    if Version(found.split("+", 1)[0]) not in SpecifierSet(patch.versions):
        raise PatchError(
            f"patch {patch.name!r} was written for {patch.distribution}{patch.versions}, but {found} is "
            f"installed; use a supported version (see README, 'Versions'), or check the patch against "
            f"{found} and widen its range in vllm_kimi_neuron/patches.py"
        )


def _apply_now(patch: Patch, module: ModuleType) -> None:
    if patch.name in _applied:
        return
    try:
        _check_and_apply(patch, module)
    except PatchError as exc:
        if not patch.optional:
            raise
        logger.warning("vllm-kimi-neuron: optional patch skipped: %s", exc)


def _check_and_apply(patch: Patch, module: ModuleType) -> None:
    check_version(patch)
    problem = patch.check(module)
    if problem is not None:
        raise PatchError(
            f"patch {patch.name!r} refuses to change {patch.module}: {problem}. The upstream code differs "
            f"from what the patch was written for ({patch.distribution}{patch.versions}); nothing was changed"
        )
    patch.apply(module)
    _applied[patch.name] = module
    logger.info("vllm-kimi-neuron: applied patch %s to %s (%s)", patch.name, patch.module, patch.why)


def applied() -> list[str]:
    return sorted(_applied)


def install(patches: Sequence[Patch]) -> None:
    """Apply each patch now if its module is imported, else as soon as it is."""
    for patch in patches:
        module = sys.modules.get(patch.module)
        if module is not None:
            _apply_now(patch, module)
        else:
            _pending.setdefault(patch.module, []).append(patch)
    if _pending and not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder())


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then the patches waiting for that module."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        for patch in _pending.pop(module.__name__, []):
            _apply_now(patch, module)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None
