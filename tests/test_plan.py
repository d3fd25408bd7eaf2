"""The deployment planner on the real Kimi-K2-Instruct-0905 shapes, and `kimi-neuron plan`."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_kimi_neuron import doctor
from vllm_kimi_neuron.config import KimiConfig
from vllm_kimi_neuron.neuron import hooks
from vllm_kimi_neuron.overrides import OverrideError, validate_additional_config
from vllm_kimi_neuron.plan import GIB, RUNTIME_RESERVE_GIB, Plan, PlanError, default_shape, make_plan
from vllm_kimi_neuron.tiny import tiny_config

KIMI = KimiConfig()
TRN2 = "trn2.48xlarge"
CLI = [str(Path(sys.executable).parent / "kimi-neuron")]


@pytest.fixture(autouse=True)
def _no_lnc_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NEURON_LOGICAL_NC_CONFIG", raising=False)


def weights(plan: Plan) -> dict[str, int]:
    return {group: nbytes for group, nbytes, _ in plan.budget.weights}


def test_tp64_plan_fits_and_its_budget_adds_up() -> None:
    plan = make_plan(KIMI, TRN2, tp=64, max_num_seqs=8, max_model_len=2048)
    lay = plan.layout
    assert (lay.lnc, lay.tp_degree, lay.ep_degree, lay.moe_tp_degree, lay.moe_ep_degree) == (2, 64, 1, 64, 1)
    assert plan.patches == []
    b = plan.budget
    assert b.capacity == 24 * GIB  # 96 GiB per chip, 4 logical cores per chip at LNC 2
    assert b.total == sum(weights(plan).values()) + b.kv_cache + b.attention_scores + b.other_activations + \
        b.reserve
    assert b.reserve == RUNTIME_RESERVE_GIB * GIB and b.headroom == b.capacity - b.total > 0

    # From first principles, per logical core at TP 64 (60 MoE layers, 61 attention layers):
    layers, moe_layers, e, h, i = 61, 60, 384, 7168, 2048
    experts = moe_layers * (e * h * (2 * i // 64) * 1       # gate_up fp8, output columns over 64 ranks
                            + e * (2 * i // 64) * 4        # gate_up fp32 scale, split like its columns
                            + e * (i // 64) * h * 1        # down fp8, input rows over 64 ranks
                            + e * h * 4)                   # down fp32 scale, the same on every rank
    q_a, kv_a = 1536 * h * 2, 576 * h * 2                  # replicated bf16
    attention = layers * (q_a + kv_a + (64 * 192 // 64) * 1536 * 2 + (64 * 256 // 64) * 512 * 2
                          + h * (64 * 128 // 64) * 2)
    assert weights(plan)["routed experts (fp8, fp32 scales)"] == experts
    assert weights(plan)["attention"] == attention
    replicated = {g: r for g, _, r in b.weights}
    assert replicated["attention"] == layers * (q_a + kv_a)
    assert replicated["routed experts (fp8, fp32 scales)"] == moe_layers * e * h * 4  # down scales
    assert b.kv_cache == layers * 2 * 8 * 2048 * 576 * 2  # K and V, 8 slots, bf16, on every core
    # The router runs in fp32 (its weight is stored bf16): 384 x 7168 x 4 B plus the fp32 bias per layer.
    assert weights(plan)["routers"] == moe_layers * e * (h + 1) * 4
    assert 17.5 < b.weight_total / GIB < 18.1  # design.md: "~18 GB of 24 GB per logical core is weights"

    table = plan.table()
    assert "| total " in table and f"{b.total / GIB:.2f}" in table and f"{b.headroom / GIB:.2f}" in table
    assert "61 layers x K,V x 8 slots x 2048 x 576 bfloat16" in table
    assert "(estimate" in table


def test_tp32_uses_whole_model_expert_parallelism_and_the_decode_patch() -> None:
    plan = make_plan(KIMI, TRN2, tp=32, max_num_seqs=8, max_model_len=2048)
    lay = plan.layout
    assert (lay.tp_degree, lay.ep_degree, lay.world) == (32, 2, 64)
    assert (lay.moe_tp_degree, lay.moe_ep_degree) == (32, 2)
    nc = plan.neuron_config
    assert (nc["tp_degree"], nc["ep_degree"], nc["moe_tp_degree"], nc["moe_ep_degree"]) == (32, 2, 32, 2)
    assert plan.patches == ["selective-loading-threshold"]
    assert set(plan.patches) <= set(hooks.PLAN_PATCHES)  # names the hooks can install
    note = plan.notes[0]
    assert "8*8/384 = 0.17" in note and "Selective Loading with Expert parallelism is not supported" in note
    assert "all 192 local experts" in note and "--max-num-seqs 48 or more needs no patch" in note
    assert any("prefill at this layout is unverified" in n and "PR #131" in n for n in plan.notes)


def test_decode_patch_boundary_is_experts_over_top_k() -> None:
    assert make_plan(KIMI, TRN2, tp=32, max_num_seqs=47, max_model_len=256).patches == [
        "selective-loading-threshold"]
    big = make_plan(KIMI, TRN2, tp=32, max_num_seqs=48, max_model_len=256)
    assert big.patches == [] and "NxD runs all 192 local experts" in big.notes[0]
    # TP 64 keeps moe_ep 1, where selective loading works: no patch at any batch
    assert make_plan(KIMI, TRN2, tp=64, max_num_seqs=1, max_model_len=1024).patches == []
    # ... unless the user asks for expert parallelism
    ep = make_plan(KIMI, TRN2, tp=64, max_num_seqs=8, max_model_len=1024, overrides={"moe_ep_degree": 2})
    assert (ep.layout.moe_tp_degree, ep.layout.moe_ep_degree, ep.layout.ep_degree) == (32, 2, 1)
    assert ep.patches == ["selective-loading-threshold"]


def test_plans_that_do_not_fit_are_refused_with_what_fits() -> None:
    with pytest.raises(PlanError) as exc:
        make_plan(KIMI, TRN2, tp=64, max_num_seqs=64, max_model_len=131072)
    text = str(exc.value)
    assert text.startswith("does not fit: ") and "24.00 GiB available on a trn2.48xlarge" in text
    assert "KV cache 1098.00" in text  # 61*2*64*131072*576*2 bytes
    assert "lower --max-model-len (at --max-num-seqs 64, up to" in text

    with pytest.raises(PlanError) as exc:
        make_plan(KIMI, TRN2, tp=64, max_num_seqs=8, max_model_len=8192)
    text = str(exc.value)
    longest = int(text.split("at --max-num-seqs 8, up to ")[1].split()[0])
    most = int(text.split("at --max-model-len 8192, up to ")[1].split()[0])
    make_plan(KIMI, TRN2, tp=64, max_num_seqs=8, max_model_len=longest)  # the suggestions fit ...
    make_plan(KIMI, TRN2, tp=64, max_num_seqs=most, max_model_len=8192)
    with pytest.raises(PlanError):  # ... and are the largest that do
        make_plan(KIMI, TRN2, tp=64, max_num_seqs=8, max_model_len=longest + 128)
    with pytest.raises(PlanError):
        make_plan(KIMI, TRN2, tp=64, max_num_seqs=most + 1, max_model_len=8192)


@pytest.mark.parametrize("tp", [64, 32])
def test_flags_left_out_get_the_largest_shape_that_fits(tp: int) -> None:
    seqs, length = default_shape(KIMI, TRN2, tp, None, None)
    assert seqs == 8 and length % 1024 == 0
    make_plan(KIMI, TRN2, tp, seqs, length)
    with pytest.raises(PlanError, match="does not fit"):
        make_plan(KIMI, TRN2, tp, seqs, length + 1024)

    seqs, length = default_shape(KIMI, TRN2, tp, None, 8192)  # only the length given
    assert length == 8192 and 1 <= seqs < 8
    make_plan(KIMI, TRN2, tp, seqs, 8192)
    with pytest.raises(PlanError, match="does not fit"):
        make_plan(KIMI, TRN2, tp, seqs + 1, 8192)

    assert default_shape(KIMI, TRN2, tp, 4, None)[1] > default_shape(KIMI, TRN2, tp, 8, None)[1]
    assert default_shape(KIMI, TRN2, tp, 16, 1024) == (16, 1024)  # both given: untouched, even if too big


def test_flags_left_out_that_cannot_fit_are_refused() -> None:
    with pytest.raises(PlanError, match="--max-model-len 262144 does not fit even with --max-num-seqs 1"):
        default_shape(KIMI, TRN2, 64, None, 262144)
    with pytest.raises(PlanError, match="--max-num-seqs 100000 does not fit at any --max-model-len"):
        default_shape(KIMI, TRN2, 64, 100000, None)


def test_a_single_chip_cannot_hold_kimi() -> None:
    with pytest.raises(PlanError, match="it needs a larger instance"):
        make_plan(KIMI, "trn2.3xlarge", tp=4, max_num_seqs=1, max_model_len=1024)
    small = make_plan(tiny_config(), "trn2.3xlarge", tp=4, max_num_seqs=4, max_model_len=512)
    assert small.budget.capacity == 24 * GIB and small.layout.world == 4


@pytest.mark.parametrize(("cfg", "tp", "overrides", "expected"), [
    (KIMI, 48, None, "num_attention_heads=64 is not divisible by tp_degree=48 (attention heads)"),
    (KIMI, 128, None, "a trn2.48xlarge has 64 logical cores at LNC 2; use 1 to 64"),
    (KIMI, 64, {"ep_degree": 2}, "tp_degree 64 x ep_degree 2 = 128 ranks"),
    (KIMI, 64, {"moe_ep_degree": 0}, "moe_ep_degree=0: parallel degrees are positive integers"),
    (KimiConfig(n_routed_experts=385), 32, {"ep_degree": 2},
     "n_routed_experts=385 is not divisible by moe_ep_degree=2 (expert groups)"),
    (KimiConfig(moe_intermediate_size=2000), 64, None,
     "moe_intermediate_size=2000 is not divisible by moe_tp_degree=64 (routed expert columns)"),
])
def test_uneven_splits_are_refused(cfg: KimiConfig, tp: int, overrides: dict | None, expected: str) -> None:
    with pytest.raises(PlanError) as exc:
        make_plan(cfg, TRN2, tp=tp, max_num_seqs=1, max_model_len=256, overrides=overrides)
    assert expected in str(exc.value)


def test_bad_requests_are_refused() -> None:
    with pytest.raises(PlanError, match="exceeds the model's max_position_embeddings 262144"):
        make_plan(KIMI, TRN2, tp=64, max_num_seqs=1, max_model_len=300000)
    with pytest.raises(PlanError, match="--max-num-seqs must be a positive integer, got 0"):
        make_plan(KIMI, TRN2, tp=64, max_num_seqs=0, max_model_len=1024)
    with pytest.raises(PlanError, match=r"unknown instance type 'trn1\.32xlarge'"):
        make_plan(KIMI, "trn1.32xlarge", tp=32, max_num_seqs=1, max_model_len=1024)


def test_blockwise_kernel_limits_are_reported() -> None:
    plan = make_plan(tiny_config(), TRN2, tp=2, max_num_seqs=4, max_model_len=512)
    assert any("hidden_size 256 must be a multiple of 512" in n for n in plan.notes)
    narrow = make_plan(KimiConfig(moe_intermediate_size=1536), TRN2, tp=64, max_num_seqs=1, max_model_len=256)
    assert any("moe_intermediate_size/moe_tp_degree = 24 must be a multiple of 16" in n for n in narrow.notes)
    assert not any("blockwise NKI kernel" in n for n in make_plan(KIMI, TRN2, 64, 1, 256).notes)


def test_lnc_follows_the_environment_like_nxdi(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEURON_LOGICAL_NC_CONFIG", "1")
    plan = make_plan(tiny_config(), TRN2, tp=2, max_num_seqs=1, max_model_len=256)
    assert plan.layout.lnc == plan.neuron_config["logical_nc_config"] == 1
    assert plan.budget.capacity == 12 * GIB
    assert plan.neuron_config["blockwise_matmul_config"]["logical_nc_config"] == 1
    with pytest.raises(PlanError, match="NEURON_LOGICAL_NC_CONFIG=1 is set"):
        make_plan(tiny_config(), TRN2, tp=2, max_num_seqs=1, max_model_len=256,
                  overrides={"logical_nc_config": 2})


def test_overrides_flow_into_the_neuron_config() -> None:
    user = validate_additional_config({"max_prompt_length": 1000,
                                       "override_neuron_config": {"save_sharded_checkpoint": False}})
    plan = make_plan(KIMI, TRN2, tp=64, max_num_seqs=4, max_model_len=2048, overrides=user)
    nc = plan.neuron_config
    assert nc["save_sharded_checkpoint"] is False
    assert nc["max_context_length"] == 1000 and nc["context_encoding_buckets"] == [128, 256, 512, 1000]
    assert nc["token_generation_buckets"] == [128, 256, 512, 1024, 2048]
    with pytest.raises(OverrideError, match="did you mean tkg_batch_size"):
        make_plan(KIMI, TRN2, tp=64, max_num_seqs=4, max_model_len=2048, overrides={"tkg_batch": 4})
    odd = make_plan(KIMI, TRN2, tp=64, max_num_seqs=4, max_model_len=2048,
                    overrides={"on_device_sampling_config": {"do_sample": True}})
    assert any("on-device sampling: no logprobs" in n for n in odd.notes)


def test_the_serve_command_carries_the_plan_and_replans_to_itself() -> None:
    plan = make_plan(KIMI, TRN2, tp=32, max_num_seqs=8, max_model_len=1024)
    env, _, command = plan.serve_command().partition(" vllm ")
    assert env == "VLLM_ENGINE_READY_TIMEOUT_S=14400"
    args = shlex.split("vllm " + command)
    assert args == plan.serve_args()
    flags = dict(zip(args[3::2], args[4::2], strict=False))
    assert args[:3] == ["vllm", "serve", "moonshotai/Kimi-K2-Instruct-0905"]
    assert flags["--tensor-parallel-size"] == "32" and flags["--max-num-seqs"] == "8"
    assert flags["--max-model-len"] == "1024" and flags["--num-gpu-blocks-override"] == "8"
    assert "--no-enable-prefix-caching" in args and "--trust-remote-code" in args
    additional = json.loads(args[args.index("--additional-config") + 1])
    assert additional == plan.additional_config() == {"override_neuron_config": plan.neuron_config}
    # What the plugin does with that command inside vLLM: the same plan again.
    again = make_plan(KIMI, TRN2, tp=32, max_num_seqs=8, max_model_len=1024,
                      overrides=validate_additional_config(additional))
    assert again.neuron_config == plan.neuron_config and again.patches == plan.patches


def test_doctor_shows_the_budget_and_reports_a_refusal(tmp_path: Path) -> None:
    ok = doctor.run([], lambda: make_plan(KIMI, TRN2, 64, 8, 2048).table(), tmp_path)
    assert "weights: routed experts (fp8, fp32 scales)" in ok.text()
    refused = doctor.run([], lambda: make_plan(KIMI, TRN2, 64, 64, 131072).table(), tmp_path)
    assert any(p.startswith("does not fit: ") for p in refused.problems)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "plan", *args], capture_output=True, text=True, timeout=120)


def test_cli_prints_table_patches_command_and_json() -> None:
    r = run("--tp", "32", "--max-num-seqs", "8", "--max-model-len", "2048")
    assert r.returncode == 0, r.stderr
    plan = make_plan(KIMI, TRN2, 32, 8, 2048)
    assert plan.table() in r.stdout
    assert "run-time patches: selective-loading-threshold" in r.stdout
    assert f"  {plan.serve_command()}\n" in r.stdout
    r = run("--tp", "32", "--max-num-seqs", "8", "--max-model-len", "2048", "--json",
            "--overrides", '{"override_neuron_config": {"skip_warmup": true}}')
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["additional_config"]["override_neuron_config"]["skip_warmup"] is True
    assert out["layout"] == {"lnc": 2, "tp_degree": 32, "ep_degree": 2, "world": 64, "moe_tp_degree": 32,
                             "moe_ep_degree": 2}
    assert out["hbm_bytes_per_core"]["total"] == plan.budget.total


def test_cli_refusals_exit_2_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    from vllm_kimi_neuron import cli

    r = run("--tp", "64", "--max-num-seqs", "64", "--max-model-len", "131072")
    assert r.returncode == 2 and r.stderr.startswith("error: does not fit: ") and "Traceback" not in r.stderr
    request = ["plan", "--tp", "64", "--max-num-seqs", "8", "--max-model-len", "2048", "--overrides"]
    assert cli.main([*request, '{"logical-nc-config": 2}']) == 2
    assert "use underscores: logical_nc_config" in capsys.readouterr().err
    assert cli.main([*request, "{bad"]) == 2
    assert "--overrides is not valid JSON" in capsys.readouterr().err


def test_cli_reads_a_model_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    r = run("--tp", "2", "--max-num-seqs", "4", "--max-model-len", "512", "--model", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["model"] == str(tmp_path) and f"vllm serve {tmp_path} " in out["serve_command"]
    assert out["hbm_bytes_per_core"]["kv_cache"] == 3 * 2 * 4 * 512 * 576 * 2


def test_readme_examples_are_current_output(capsys: pytest.CaptureFixture[str]) -> None:
    from vllm_kimi_neuron import cli

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"\nTP (64|32)[ ,][^\n]*real output.*?```text\n(.*?)\n```", readme, re.S)
    assert [tp for tp, _ in blocks] == ["64", "32"]
    for tp, shown in blocks:
        assert cli.main(["plan", "--instance", TRN2, "--tp", tp, "--max-num-seqs", "8", "--max-model-len",
                         "2048"]) == 0
        assert capsys.readouterr().out.startswith(shown), f"README's TP {tp} example is stale"
