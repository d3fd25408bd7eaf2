"""What the device path does to our model, observed on NxDI's own code: the dtypes after
``DecoderModelInstance.load_module()`` with the planner's bf16 config, and a restart that finds the
``neuron_config.json`` NxDI itself wrote when it compiled."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from cpu_runs import HERE, run
from nxdi_cpu import LAYOUTS, MAX_MODEL_LEN, MAX_NUM_SEQS, neuron_config

from vllm_kimi_neuron import artifacts


@pytest.fixture(scope="module")
def dtypes(tiny: dict[str, Path]) -> dict[str, dict[str, str]]:
    out = tiny["root"] / "dtypes.json"
    run([sys.executable, str(HERE / "worker.py"), "dtypes", str(tiny["fp8"]), str(tiny["converted"]),
         str(tiny["root"] / "unused"), "tp1", str(MAX_NUM_SEQS), str(MAX_MODEL_LEN), str(out)],
        tiny["root"] / "dtypes.log")
    return json.loads(out.read_text())


def test_routing_and_rope_keep_float32_through_nxdi_casting(dtypes: dict[str, dict[str, str]]) -> None:
    """NxDI casts every floating tensor whose name does not end in 'scale' to the model dtype; the
    router (its weight and the expert-choice bias) must stay in the reference's fp32, and no RoPE
    table may be stored where it would be cast."""
    for tag, found in dtypes.items():
        router = {n: d for n, d in found.items() if ".mlp.router." in n}
        assert len(router) == 4 and set(router.values()) == {"float32"}, (tag, router)
        assert not [n for n in found if "inv_freq" in n or "cos" in n or "sin" in n], tag
        experts = {n: d for n, d in found.items() if n.endswith("expert_mlps.mlp_op.gate_up_proj.weight")}
        assert experts and set(experts.values()) == {"float8_e4m3fn"}, (tag, experts)
        assert found["layers.1.mlp.expert_mlps.mlp_op.gate_up_proj.scale"] == "float32"
        assert found["layers.1.self_attn.kv_b_proj.weight"] == "bfloat16"
        assert found["lm_head.weight"] == "bfloat16"


def test_restart_reuses_what_nxdi_stored_and_refuses_a_change(tiny: dict[str, Path], tmp_path: Path) -> None:
    """A compile stores NxDI's own ``neuron_config.json`` (written here by NxDI's ``InferenceConfig.save``
    in the directory ``artifacts.choose`` picked); the same request at the next start must reuse it."""
    from vllm_kimi_neuron.neuron.hooks import register_kimi_hf_config
    from vllm_kimi_neuron.neuron.modeling import stored_neuron_config

    register_kimi_hf_config()
    nc, _ = neuron_config(tiny["fp8"], tiny["converted"], LAYOUTS["tp2"], MAX_NUM_SEQS, MAX_MODEL_LEN)
    versions = artifacts.package_versions()

    def choose(request: dict, user_dir: Path | None = None) -> artifacts.Decision:
        return artifacts.choose(tmp_path, "rev", request, versions, user_dir,
                                as_stored=stored_neuron_config(tiny["fp8"], request))

    first = choose(nc)
    assert first.action == "compile"
    run([sys.executable, str(HERE / "worker.py"), "shard", str(tiny["fp8"]), str(tiny["converted"]),
         str(first.directory), "tp2", str(MAX_NUM_SEQS), str(MAX_MODEL_LEN)], tmp_path / "shard.log")
    stored = json.loads((first.directory / artifacts.CONFIG_FILE).read_text())["neuron_config"]
    assert "normalize_top_k_affinities" in stored and "disable_normalize_top_k_affinities" not in stored
    # Stand-in for the traced model neuronx-cc would have produced (nothing compiles here).
    (first.directory / artifacts.MODEL_FILE).write_bytes(b"stand-in for the compiled model")
    artifacts.mark_complete(first.directory)

    again = choose(nc)
    assert again.action == "reuse" and again.directory == first.directory, again

    user = tmp_path / "user-dir"
    shutil.copytree(first.directory, user)
    assert choose(nc, user).action == "reuse"
    with pytest.raises(artifacts.StaleArtifactsError, match="batch_size: stored 2, requested 4"):
        choose({**nc, "batch_size": 4, "tkg_batch_size": 4, "max_batch_size": 4}, user)


@pytest.mark.parametrize("length", [2048, 32768])
def test_compiler_flags_are_nxdis_own_per_submodel(tiny: dict[str, Path], length: int) -> None:
    """NxDI picks neuronx-cc flags per submodel (and adds long-context ones from 32K tokens) only when
    the model supplies none; the Kimi model must get them."""
    from nxdi_cpu import build_application

    nc, _ = neuron_config(tiny["fp8"], tiny["converted"], LAYOUTS["tp2"], MAX_NUM_SEQS, length,
                          cpu_changes=False)
    app = build_application(tiny["fp8"], nc)
    cte, tkg = app.context_encoding_model.compiler_args, app.token_generation_model.compiler_args
    assert " -O1 " in cte and "--modular-flow-mac-threshold=10" in cte and " -O2 " in tkg, (cte, tkg)
    assert "--experimental-unsafe-fp8e4m3fn-as-fp8e4m3" in cte and "--auto-cast=none" in tkg
    long_context = "--internal-disable-fma-on-ios" in cte and "--hbm-scratchpad-page-size=1024" in cte
    assert long_context == (length >= 32768), cte
