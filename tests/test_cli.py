import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from vllm_kimi_neuron.launch import free_port

CLI = [str(Path(sys.executable).parent / "kimi-neuron")]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=300)


def test_make_tiny_with_bf16_copy(tmp_path: Path) -> None:
    r = run("make-tiny", str(tmp_path / "m"), "--seed", "3", "--preset", "no-q-lora",
            "--bf16", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    assert "preset no-q-lora, seed 3" in r.stdout
    assert json.loads((tmp_path / "m" / "config.json").read_text())["q_lora_rank"] is None
    assert "quantization_config" not in json.loads((tmp_path / "b" / "config.json").read_text())


def test_bad_input_gets_a_clear_error(tmp_path: Path) -> None:
    r = run("make-tiny", str(tmp_path / "m"), "--preset", "huge")
    assert r.returncode == 2 and "invalid choice: 'huge'" in r.stderr
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    r = run("convert", "--model", str(tmp_path / "llama"), "--out", str(tmp_path / "o"), "--format", "bf16")
    assert r.returncode == 2 and "does not include 'DeepseekV3ForCausalLM'" in r.stderr
    assert "Traceback" not in r.stderr


def test_demo_serves_and_its_curl_line_works(tmp_path: Path) -> None:
    port = free_port()
    demo = subprocess.Popen([*CLI, "demo", "--dir", str(tmp_path), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        curl = None
        deadline = time.monotonic() + 300
        assert demo.stdout is not None
        while curl is None and time.monotonic() < deadline:
            line = demo.stdout.readline()
            assert line or demo.poll() is None, "demo exited before it was ready"
            if line.strip().startswith("curl "):
                curl = line.strip()
        assert curl is not None and f"127.0.0.1:{port}" in curl
        answer = subprocess.run([*shlex.split(curl), "-sS", "--fail"], capture_output=True,
                                text=True, timeout=60, check=True)
        assert json.loads(answer.stdout)["usage"]["completion_tokens"] > 0
    finally:
        demo.send_signal(signal.SIGTERM)
        demo.wait(60)
    # the demo's server went with it: nothing listens on the port any more
    r = subprocess.run(["curl", "-s", f"http://127.0.0.1:{port}/health"], capture_output=True)
    assert r.returncode != 0
    assert sorted(p.name for p in (tmp_path / "tiny-kimi-seed0").iterdir()) == ["bf16", "fp8"]
