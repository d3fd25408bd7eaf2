"""Compiled-artifact directories: one per (model revision, neuron config, package and SDK versions).

vllm-neuron reuses compiled artifacts only through ``NEURON_COMPILED_ARTIFACTS``, takes the
configuration from the stored ``neuron_config.json`` when it does (so later overrides are silently
ignored), and otherwise deletes and recompiles at every start. Here every distinct configuration
gets its own directory under a root, named by a hash of everything that shapes the compiled
graphs; a matching directory is reused with one log line, a stored configuration that disagrees
with the request is refused with a diff, and nothing a user compiled is ever deleted (an
interrupted compile is moved aside, not removed).

NxDI stores its configuration in its own form (keys renamed, objects as their ``__dict__``), so the
request is compared in that form: the caller passes what NxDI would store for it
(``neuron.modeling.stored_neuron_config``). NxDI writes ``model.pt`` before it shards the weights,
so a compile counts as finished only by this package's mark, written after NxDI's compile returns.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

# What NxDI writes: the config first, then the traced model, then the sharded weights.
CONFIG_FILE = "neuron_config.json"
MODEL_FILE = "model.pt"
KEY_FILE = "kimi_neuron_artifacts.json"
# Written by this package once NxDI's compile (tracing, compiling and sharding) has returned.
COMPLETE_FILE = "kimi_neuron_compiled.json"

# Packages whose versions change what the compiler produces or how it is loaded.
VERSIONED_PACKAGES = ("vllm-kimi-neuron", "neuronx-distributed-inference", "neuronx-distributed",
                      "neuronx-cc", "torch-neuronx", "vllm-neuron", "vllm", "torch")


class StaleArtifactsError(RuntimeError):
    """Stored compiled artifacts whose configuration is not the one requested."""


def package_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def artifact_key(model_revision: str, neuron_config: dict[str, Any], versions: dict[str, str | None]) -> str:
    """16 hex digits of sha256 over the canonical JSON of the three inputs."""
    blob = json.dumps({"model": model_revision, "neuron_config": neuron_config, "versions": versions},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _normal(value: Any) -> Any:
    """Compare values the way NxDI serialises them: dtypes as their short names, tuples as lists."""
    if isinstance(value, str) and value.startswith("torch."):
        return value[len("torch."):]
    if isinstance(value, tuple | list):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    return value


def config_diff(stored: dict[str, Any], requested: dict[str, Any], prefix: str = "") -> list[str]:
    """Every requested key whose stored value differs (keys NxDI adds on its own are not compared)."""
    lines = []
    for key in sorted(requested):
        want, name = _normal(requested[key]), prefix + key
        if key not in stored:
            lines.append(f"{name}: not stored, requested {want!r}")
            continue
        have = _normal(stored[key])
        if isinstance(want, dict) and isinstance(have, dict):
            lines.extend(config_diff(have, want, name + "."))
        elif have != want:
            lines.append(f"{name}: stored {have!r}, requested {want!r}")
    return lines


def stored_neuron_config(directory: Path) -> dict[str, Any]:
    raw = json.loads((directory / CONFIG_FILE).read_text())
    return raw.get("neuron_config", raw)


def mark_complete(directory: Path) -> None:
    """Record that NxDI's compile into ``directory`` finished (call after it returns)."""
    stamp = {"completed": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (directory / COMPLETE_FILE).write_text(json.dumps(stamp) + "\n")


def is_complete(directory: Path) -> bool:
    return (directory / COMPLETE_FILE).exists()


@dataclass(frozen=True)
class Decision:
    directory: Path
    action: Literal["reuse", "compile"]
    note: str


def _stale(directory: Path, expected: dict[str, Any]) -> list[str]:
    return config_diff(stored_neuron_config(directory), expected)


def choose(root: Path, model_revision: str, neuron_config: dict[str, Any],
           versions: dict[str, str | None], user_dir: Path | None = None,
           as_stored: dict[str, Any] | None = None) -> Decision:
    """Where to compile or what to reuse for this request.

    ``as_stored`` is the request in the form NxDI writes to ``neuron_config.json`` (default: the
    request itself). ``user_dir`` is a ``NEURON_COMPILED_ARTIFACTS`` the user set: it is used as
    given, but only if it holds a finished compile whose stored configuration agrees, or nothing.
    """
    expected = neuron_config if as_stored is None else as_stored
    if user_dir is not None:
        if is_complete(user_dir):
            diff = _stale(user_dir, expected)
            if diff:
                raise StaleArtifactsError(
                    f"NEURON_COMPILED_ARTIFACTS={user_dir} was compiled with another configuration; "
                    "vllm-neuron would serve it and ignore your request:\n  " + "\n  ".join(diff) +
                    "\nunset NEURON_COMPILED_ARTIFACTS to get a directory per configuration, or point it "
                    "at an empty directory to compile this one there"
                )
            return Decision(user_dir, "reuse", f"reusing compiled artifacts in {user_dir}"
                            " (NEURON_COMPILED_ARTIFACTS)")
        if user_dir.exists() and any(user_dir.iterdir()):
            raise StaleArtifactsError(
                f"NEURON_COMPILED_ARTIFACTS={user_dir} holds files but no finished compile by "
                f"vllm-kimi-neuron (no {COMPLETE_FILE}): an interrupted compile (NxDI writes {MODEL_FILE} "
                "before it shards the weights) or one made by another tool, which vllm-neuron would load as "
                "it is. Move it away or point NEURON_COMPILED_ARTIFACTS at an empty directory; nothing was "
                "deleted"
            )
        return Decision(user_dir, "compile", f"compiling into {user_dir} (NEURON_COMPILED_ARTIFACTS)")
    key = artifact_key(model_revision, neuron_config, versions)
    directory = root / key
    if is_complete(directory):
        diff = _stale(directory, expected)
        if diff:
            raise StaleArtifactsError(
                f"{directory} is keyed for this configuration but its {CONFIG_FILE} disagrees (edited by "
                "hand, or written by another tool):\n  " + "\n  ".join(diff) +
                f"\nmove {directory} away to recompile; nothing was deleted"
            )
        return Decision(directory, "reuse", f"reusing compiled artifacts {directory} (key {key})")
    note = f"compiling into {directory} (key {key}; no finished compile for this configuration yet)"
    if directory.exists() and any(directory.iterdir()):
        aside = directory.with_name(f"{directory.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
        directory.rename(aside)
        note += f"; an interrupted compile was moved to {aside}"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / KEY_FILE).write_text(json.dumps(
        {"key": key, "model": model_revision, "neuron_config": neuron_config, "versions": versions},
        indent=2, sort_keys=True, default=str) + "\n")
    return Decision(directory, "compile", note)
