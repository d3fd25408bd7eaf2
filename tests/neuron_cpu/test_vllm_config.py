"""vLLM 0.16 and vllm-neuron 0.5.0 building a Kimi-K2 serve's configuration with this plugin loaded
by vLLM's own plugin machinery: the bare command starts (no prefix caching, the planner's shape,
``kimi_k2`` known without remote code), and vllm-neuron's own ``get_neuron_model`` hands NxDI the
planned config; see ``vllm_worker.py`` for the one stand-in (the device check) and where it stops
(the compiler)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from cpu_runs import HERE, run

from vllm_kimi_neuron.config import KimiConfig
from vllm_kimi_neuron.plan import default_shape

KIMI_ID = "moonshotai/Kimi-K2-Instruct-0905"


def build(model: str, out: Path, env: dict[str, str], engine_args: dict[str, Any] | None = None,
          through_loader: bool = False) -> dict[str, Any]:
    args = [sys.executable, str(HERE / "vllm_worker.py"), model, str(out), json.dumps(engine_args or {})]
    run(args + (["--through-get-neuron-model"] if through_loader else []), out.with_suffix(".log"),
        extra_env=env)
    return json.loads(out.read_text())


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"KIMI_NEURON_HOME": str(tmp_path / "home"), "KIMI_NEURON_INSTANCE": "trn2.48xlarge",
            "HF_HOME": str(tmp_path / "hf")}


def test_bare_serve_of_the_tiny_model_reaches_nxdi_with_the_planned_config(
        tiny: dict[str, Path], tmp_path: Path, env: dict[str, str]) -> None:
    built = build(str(tiny["fp8"]), tmp_path / "tp2.json", env, {"tensor_parallel_size": 2},
                  through_loader=True)
    seqs, length = default_shape(KimiConfig.from_dir(tiny["fp8"]), "trn2.48xlarge", 2, None, None)
    assert (built["max_num_seqs"], built["max_model_len"]) == (seqs, length)
    # vLLM V1 would turn prefix caching on; vllm-neuron would then assert or build the block KV layout.
    assert (built["enable_prefix_caching"], built["enable_chunked_prefill"]) == (False, False)
    assert built["block_size"] == length  # vllm-neuron's contiguous layout: one block per sequence
    loader = built["loader"]
    assert loader["cls"] == "vllm_kimi_neuron.neuron.modeling.NeuronKimiK2ForCausalLM"
    assert loader["compiled_path"].startswith(env["KIMI_NEURON_HOME"] + "/compiled/")
    nc = loader["neuron_config"]
    assert (nc["is_prefix_caching"], nc["is_block_kv_layout"]) == (False, False)
    assert nc["is_continuous_batching"] is True
    assert (nc["tp_degree"], nc["batch_size"], nc["tkg_batch_size"], nc["ctx_batch_size"], nc["seq_len"]) == (
        2, seqs, seqs, 1, length)
    assert (nc["quantized"], nc["quantization_type"], nc["torch_dtype"]) == (
        True, "expert_wise_per_channel_symmetric", "bfloat16")
    assert nc["quantized_checkpoints_path"].startswith(env["KIMI_NEURON_HOME"] + "/converted/")
    assert nc["on_device_sampling_config"] is None and nc["normalize_top_k_affinities"] is False


def test_without_this_plugin_vllm_does_not_know_kimi_k2(tiny: dict[str, Path], tmp_path: Path,
                                                       env: dict[str, str]) -> None:
    with pytest.raises(AssertionError, match="kimi_k2"):
        build(str(tiny["fp8"]), tmp_path / "none.json", {**env, "VLLM_PLUGINS": "neuron"},
              {"tensor_parallel_size": 2})


def test_asking_for_prefix_caching_is_refused_with_the_reason(tiny: dict[str, Path], tmp_path: Path,
                                                             env: dict[str, str]) -> None:
    with pytest.raises(AssertionError, match="--enable-prefix-caching: not supported for Kimi-K2 on Neuron"):
        build(str(tiny["fp8"]), tmp_path / "pc.json", env, {"tensor_parallel_size": 2,
                                                           "enable_prefix_caching": True})


def _kimi_snapshot(hf_home: Path) -> None:
    """moonshotai/Kimi-K2-Instruct-0905 in a Hugging Face cache: its config.json (KimiConfig's defaults
    are the real model's) and a tokenizer_config.json naming its remote-code tokenizer, no weights."""
    repo = hf_home / "hub" / "models--moonshotai--Kimi-K2-Instruct-0905"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    (snapshot / "config.json").write_text(json.dumps(KimiConfig().to_dict()))
    (snapshot / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]}}))


@pytest.mark.parametrize("tp", [32, 64])
def test_the_headline_command_builds_a_config_that_fits(tp: int, tmp_path: Path, env: dict[str, str]) -> None:
    """``vllm serve moonshotai/Kimi-K2-Instruct-0905 --tensor-parallel-size N`` up to vllm-neuron's
    platform checks (the rest needs the 1 TB checkpoint); the tokenizer is served without remote code
    only if asked (--skip-tokenizer-init here), else refused naming --trust-remote-code."""
    _kimi_snapshot(Path(env["HF_HOME"]))
    # vLLM reserves 4 GiB of host swap per rank and refuses more than this 24 GB machine has; a
    # trn2.48xlarge has 2 TiB. Not a Neuron setting: only this machine's size.
    small_host = {"swap_space": 0.25}
    with pytest.raises(AssertionError, match=r"remote code .*pass --trust-remote-code"):
        build(KIMI_ID, tmp_path / "refused.json", env, {"tensor_parallel_size": tp, **small_host})
    built = build(KIMI_ID, tmp_path / f"tp{tp}.json", env,
                  {"tensor_parallel_size": tp, "skip_tokenizer_init": True, **small_host})
    assert (built["max_num_seqs"], built["max_model_len"]) == default_shape(KimiConfig(), "trn2.48xlarge", tp,
                                                                            None, None)
    assert (built["enable_prefix_caching"], built["enable_chunked_prefill"]) == (False, False)
    assert built["scheduler_cls"].endswith("ContinuousBatchingNeuronScheduler")
