"""``kimi-neuron doctor``: what this machine has, what the plugin would do on it, and what is wrong.

Runs anywhere (on a machine without Trainium it says so and exits 1); nothing here imports the
Neuron SDK, so a broken installation is reported rather than crashing the report.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import artifacts
from .patches import Patch, PatchError, check_version

# The stack this release was written and statically checked against (Neuron SDK 2.29).
SUPPORTED = {
    "vllm-neuron": "0.5.0",
    "neuronx-distributed-inference": "0.9.",
    "neuronx-distributed": "0.18.",
    "vllm": "0.16.",
    "torch-neuronx": "2.9.",
}


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def section(self, title: str) -> None:
        self.lines.append(f"\n## {title}")

    def add(self, line: str) -> None:
        self.lines.append(f"  {line}")

    def problem(self, line: str) -> None:
        self.problems.append(line)
        self.lines.append(f"  PROBLEM: {line}")

    def text(self) -> str:
        verdict = ("\nno problems found" if not self.problems else
                   f"\n{len(self.problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in self.problems))
        return "\n".join(self.lines).lstrip("\n") + "\n" + verdict


def _wanted(prefix: str) -> str:
    return f"{prefix}x" if prefix.endswith(".") else prefix


def _versions(report: Report) -> None:
    report.section("packages")
    versions = artifacts.package_versions()
    for name, found in versions.items():
        want = SUPPORTED.get(name)
        if found is None:
            if want is not None:
                report.problem(f"{name} is not installed (need {_wanted(want)}, Neuron SDK 2.29)")
            else:
                report.add(f"{name}: not installed")
        elif want is not None and not found.startswith(want):
            report.problem(f"{name} {found} is installed; this release targets {_wanted(want)} "
                           "(Neuron SDK 2.29)")
        else:
            report.add(f"{name}: {found}")


def _devices(report: Report) -> None:
    report.section("Neuron devices")
    devices = sorted(Path("/dev").glob("neuron[0-9]*"))
    if not devices:
        report.problem("no Neuron devices (/dev/neuron*): this machine cannot serve on Trainium")
    else:
        report.add(f"{len(devices)} devices: {devices[0]} .. {devices[-1]}")
    lnc = os.environ.get("NEURON_LOGICAL_NC_CONFIG")
    report.add(f"logical NeuronCore config: {lnc} (NEURON_LOGICAL_NC_CONFIG)" if lnc else
               "logical NeuronCore config: platform default (2 on trn2); the plan sets 2")


def _patches(report: Report, patches: list[Patch]) -> None:
    report.section("run-time patches")
    for patch in patches:
        try:
            check_version(patch)
        except PatchError as exc:
            installed = "is not installed" not in str(exc)
            (report.problem if installed else report.add)(str(exc))
            continue
        report.add(f"{patch.name}: {patch.distribution} in range {patch.versions}; applied when "
                   f"{patch.module} is imported")


def _artifacts(report: Report, root: Path) -> None:
    report.section(f"compiled artifacts ({root})")
    entries = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not entries:
        report.add("none yet: the first start compiles (tens of minutes)")
    for directory in entries:
        state = ("complete" if artifacts.is_complete(directory)
                 else f"incomplete (no {artifacts.COMPLETE_FILE}: the compile did not finish)")
        key_file = directory / artifacts.KEY_FILE
        summary = ""
        if key_file.exists():
            cfg = json.loads(key_file.read_text()).get("neuron_config", {})
            summary = ", ".join(f"{k}={cfg[k]}" for k in ("tp_degree", "batch_size", "seq_len") if k in cfg)
        report.add(f"{directory.name}: {state}{'; ' + summary if summary else ''}")


def run(patches: list[Patch], plan_table: Callable[[], str] | None, artifacts_root: Path) -> Report:
    report = Report()
    _versions(report)
    _devices(report)
    _patches(report, patches)
    _artifacts(report, artifacts_root)
    if plan_table is not None:
        report.section("planned memory budget")
        try:
            report.lines.extend("  " + line for line in plan_table().splitlines())
        except ValueError as exc:  # the planner's errors say what to change
            report.problem(str(exc))
    return report
