"""On a trn2 host with the Neuron container: the plugin must see vllm-neuron and enter Neuron mode."""

import importlib.util

from vllm_kimi_neuron import plugin


def test_vllm_neuron_present_and_plugin_in_neuron_mode() -> None:
    assert importlib.util.find_spec("vllm_neuron") is not None, "vllm-neuron is not installed"
    assert plugin.detect_mode() == "neuron"
