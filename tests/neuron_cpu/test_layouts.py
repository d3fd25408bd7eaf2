"""Our NxDI model in every layout the planner emits for TP 32/64 that fits on 2 cores, built and
loaded the device's way and run by NxDI's own ``forward`` (prefill one sequence at a time, then
continuous-batching decode at different positions), against the pure-torch reference."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from nxdi_cpu import DECODE, PROMPTS
from nxdi_cpu import LAYOUTS as NXDI_LAYOUTS

# fp32 on both sides; what remains is summation order (NxD's sharded matmuls and all-reduces). Seen:
# max |diff| / max |logit| about 1.2e-6 for every layout.
REL_TOLERANCE = 1e-5
LAYOUTS = ["tp1", "tp2", "tp4", "tp2-moe-ep2", "tp1-ep4", "tp2-ep2"]


def _rows(logits: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([logits[f"prefill{i}"][None] for i in range(len(PROMPTS))]
                     + [logits[f"decode{s}"] for s in range(len(DECODE))])


def compare(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, Any]:
    g, w = _rows(got), _rows(want)
    return {"max_abs": (g - w).abs().max().item(), "max_rel": ((g - w).abs().max() / w.abs().max()).item(),
            "top1": int((g.argmax(-1) == w.argmax(-1)).sum()), "rows": g.shape[0]}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_logits_equal_reference_on_the_served_weights(layout: str, run_layout: Any, reference: Any) -> None:
    result = run_layout(layout)
    served = compare(result["logits"], reference["served"])
    original = compare(result["logits"], reference["fp8"])
    conversion = compare(reference["served"], reference["fp8"])
    print(f"\n{layout} ({NXDI_LAYOUTS[layout].stands_for}): vs reference on the served weights {served}; "
          f"vs the original checkpoint {original} (the conversion alone, reference vs reference: "
          f"{conversion})")
    assert served["max_rel"] < REL_TOLERANCE, served
    assert served["top1"] == served["rows"], served
    # Against the original checkpoint the NxDI model is off by exactly what the conversion costs.
    assert abs(original["max_abs"] - conversion["max_abs"]) < 1e-3, (original, conversion)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_only_the_kv_cache_and_rank_ids_are_not_in_the_shard(layout: str, run_layout: Any) -> None:
    """Every weight the device-path module holds comes from NxD's shard file; what is left is state
    NxDI creates itself (the KV cache, each rank's id)."""
    for tag, missing in run_layout(layout)["missing"].items():
        unexpected = [k for k in missing if "past_key_values" not in k and not k.endswith("rank")]
        assert not unexpected, (tag, unexpected)
