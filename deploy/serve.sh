#!/usr/bin/env bash
# The server, as systemd, the container image and Kubernetes run it:
#   vllm serve $KIMI_MODEL --port $KIMI_PORT [--shutdown-timeout $KIMI_DRAIN_TIMEOUT_S] $VLLM_SERVE_ARGS "$@"
# exec: vllm becomes this process, so it is systemd's main PID (Type=notify) or a container's PID 1,
# and gets SIGTERM itself.
set -euo pipefail
: "${KIMI_MODEL:?set KIMI_MODEL to the Hugging Face checkpoint directory}"
read -r -a serve_args <<< "${VLLM_SERVE_ARGS:-}"

# --shutdown-timeout (drain in-flight requests on SIGTERM) exists in newer vLLM (0.32 has it) but
# not in the 0.16 of Neuron SDK 2.29, which rejects unknown flags. Look for it in vLLM's argument
# definitions without importing vLLM (seconds saved at every start). Without it, the supervisor
# drains first: systemd's ExecStop and Kubernetes' preStop run `kimi-neuron drain`.
if python3 - << 'PY'
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("vllm")
args = pathlib.Path(spec.origin).parent / "engine" / "arg_utils.py" if spec and spec.origin else None
sys.exit(0 if args is not None and args.is_file() and '"--shutdown-timeout"' in args.read_text() else 1)
PY
then
  serve_args=(--shutdown-timeout "${KIMI_DRAIN_TIMEOUT_S:-300}" "${serve_args[@]}")
fi
exec vllm serve "$KIMI_MODEL" --port "${KIMI_PORT:-8000}" "${serve_args[@]}" "$@"
