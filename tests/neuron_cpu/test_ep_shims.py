"""The CPU-mode shims for expert parallelism change no numbers: NxD's routed experts alone
(``ExpertMLPsV2``, no shared expert) at ep 2 with the shims equal the same module at ep 1 without
them, on the same weights and inputs, on NxD's dropless prefill and decode paths; and without the
shims ep 2 does not run at all (so the shims are what makes it run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from cpu_runs import HERE, torchrun


@pytest.fixture(scope="module")
def runs(tiny: dict[str, Path]) -> dict[str, Any]:
    root = tiny["root"]
    out = {}
    for name, nproc, shims in (("ep1", 1, "0"), ("ep2", 2, "1")):
        path = root / f"experts-{name}.pt"
        torchrun(nproc, HERE / "ep_worker.py", [str(tiny["fp8"]), str(path), shims],
                 root / f"experts-{name}.log")
        out[name] = torch.load(path)
    return out


def test_ep2_with_shims_equals_ep1_without(runs: dict[str, Any]) -> None:
    for path in ("prefill", "decode"):
        ep1, ep2 = runs["ep1"][path], runs["ep2"][path]
        assert ep1.abs().max() > 0.1  # the experts did something
        torch.testing.assert_close(ep2, ep1, rtol=1e-6, atol=1e-6)


def test_ep2_without_shims_fails_in_nxd(tiny: dict[str, Path]) -> None:
    with pytest.raises(AssertionError, match=r"_mesh|has no attribute 'size'"):
        torchrun(2, HERE / "ep_worker.py", [str(tiny["fp8"]), str(tiny["root"] / "unshimmed.pt"), "0"],
                 tiny["root"] / "experts-unshimmed.log")
