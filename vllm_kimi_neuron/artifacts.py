"""Compiled-artifact directories: one per (model revision, neuron config, package and SDK versions).

vllm-neuron reuses compiled artifacts only through ``NEURON_COMPILED_ARTIFACTS``, takes the
configuration from the stored ``neuron_config.json`` when it does (so later overrides are silently
ignored), and otherwise deletes and recompiles at every start. Here every distinct configuration
gets its own directory under a root, named by a hash of everything that shapes the compiled
graphs; a matching directory is reused with one log line, a stored configuration that disagrees
with the request is refused with a diff, and nothing a user compiled is ever deleted (an
interrupted compile is moved aside, not removed).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

# What NxDI writes: the config first, the traced model when compilation has finished.
CONFIG_FILE = "neuron_config.json"
MODEL_FILE = "model.pt"
KEY_FILE = "kimi_neuron_artifacts.json"

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


@dataclass(frozen=True)
class Decision:
    directory: Path
    action: Literal["reuse", "compile"]
    note: str


def choose(root: Path, model_revision: str, neuron_config: dict[str, Any],
           versions: dict[str, str | None], user_dir: Path | None = None) -> Decision:
    """Where to compile or what to reuse for this request.

    ``user_dir`` is a ``NEURON_COMPILED_ARTIFACTS`` the user set: it is used as given, but only if
    its stored configuration agrees with the request.
    """
    if user_dir is not None:
        if (user_dir / MODEL_FILE).exists():
            diff = config_diff(stored_neuron_config(user_dir), neuron_config)
            if diff:
                raise StaleArtifactsError(
                    f"NEURON_COMPILED_ARTIFACTS={user_dir} was compiled with another configuration; "
                    "vllm-neuron would serve it and ignore your request:\n  " + "\n  ".join(diff) +
                    "\nunset NEURON_COMPILED_ARTIFACTS to get a directory per configuration, or point it "
                    "at an empty directory to compile this one there"
                )
            return Decision(user_dir, "reuse", f"reusing compiled artifacts in {user_dir}"
                            " (NEURON_COMPILED_ARTIFACTS)")
        return Decision(user_dir, "compile", f"compiling into {user_dir} (NEURON_COMPILED_ARTIFACTS)")
    key = artifact_key(model_revision, neuron_config, versions)
    directory = root / key
    if (directory / MODEL_FILE).exists():
        diff = config_diff(stored_neuron_config(directory), neuron_config)
        if diff:
            raise StaleArtifactsError(
                f"{directory} is keyed for this configuration but its {CONFIG_FILE} disagrees (edited by "
                "hand, or written by another tool):\n  " + "\n  ".join(diff) +
                f"\nmove {directory} away to recompile; nothing was deleted"
            )
        return Decision(directory, "reuse", f"reusing compiled artifacts {directory} (key {key})")
    note = f"compiling into {directory} (key {key}; no artifacts for this configuration yet)"
    if directory.exists() and any(directory.iterdir()):
        aside = directory.with_name(f"{directory.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
        directory.rename(aside)
        note += f"; an interrupted compile was moved to {aside}"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / KEY_FILE).write_text(json.dumps(
        {"key": key, "model": model_revision, "neuron_config": neuron_config, "versions": versions},
        indent=2, sort_keys=True, default=str) + "\n")
    return Decision(directory, "compile", note)
