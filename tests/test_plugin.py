import importlib.metadata as md
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_kimi_neuron import plugin


@pytest.fixture
def fresh_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plugin, "_registered_mode", None)


def test_declared_as_general_plugin_not_platform_plugin() -> None:
    ours = [ep for ep in md.distribution("vllm-kimi-neuron").entry_points]
    assert {(ep.group, ep.name, ep.value) for ep in ours} == {
        ("vllm.general_plugins", "kimi_neuron", "vllm_kimi_neuron.plugin:register"),
        ("console_scripts", "kimi-neuron", "vllm_kimi_neuron.cli:main"),
    }


def test_register_is_idempotent_and_logs_once(fresh_plugin: None, capsys: pytest.CaptureFixture,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vllm")
    assert plugin.register() == "inert"
    assert plugin.register() == "inert"
    out = capsys.readouterr().err + caplog.text
    assert out.count("registered in pid") == 1 and "mode=inert" in out


def test_neuron_mode_detected_without_importing_vllm_neuron(
    fresh_plugin: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stand-in for the vllm-neuron package (not installable here): a module that fails if imported,
    # so the test also proves detection never imports it.
    pkg = tmp_path / "vllm_neuron"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('stand-in for vllm-neuron: must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert plugin.detect_mode() == "neuron"
    assert plugin.register() == "neuron"
    assert "vllm_neuron" not in sys.modules


def test_importing_the_plugin_is_cheap() -> None:
    code = ("import sys, vllm_kimi_neuron.plugin as p; p.register(); "
            "heavy = [m for m in ('torch', 'vllm', 'transformers', 'safetensors') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
