"""Hardware tests: they run only on a machine with a Neuron device and skip everywhere else."""

from pathlib import Path

import pytest

HAS_NEURON = Path("/dev/neuron0").exists()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs a Trainium device (/dev/neuron0)")
    for item in items:
        if not HAS_NEURON and "tests/neuron/" in str(item.fspath):
            item.add_marker(skip)
