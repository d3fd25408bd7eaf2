#!/usr/bin/env bash
# Prepare a Kimi-K2 server once, before it serves: convert the checkpoint and compile the model.
# Idempotent: a verified conversion is not redone, and the compile step is skipped when this exact
# configuration (serve command, converted checkpoint, package versions) was prepared before.
#
# Compiling is done by one warm start: `vllm serve` with the serving arguments is started, waited for
# until it answers /health (vllm-neuron compiles into the keyed artifact directory under
# $KIMI_NEURON_HOME/compiled on the way), then stopped. Later starts reuse those artifacts.
#
# Settings (environment; systemd reads them from the EnvironmentFile, Kubernetes from the pod spec):
#   KIMI_MODEL              Hugging Face checkpoint directory (required)
#   KIMI_NEURON_CHECKPOINT  where the converted checkpoint goes (required)
#   KIMI_CONVERT_FORMAT     neuron-fp8 (default) or bf16
#   KIMI_CONVERT_ARGS       extra `kimi-neuron convert` arguments, e.g. "--workers 32"
#   KIMI_SERVE_MODEL        the model argument of `vllm serve` (default: $KIMI_MODEL)
#   VLLM_SERVE_ARGS         the serving arguments, e.g. "--tensor-parallel-size 64"
#   KIMI_NEURON_HOME        where compiled artifacts and the prepared stamps live
#   KIMI_PREPARE_PORT       loopback port for the warm start (default 8011)
#   KIMI_PREPARE_TIMEOUT_S  give up on the warm start after this many seconds (default 14400)
# Usage: prepare.sh          prepare (exit 0 when done, non-zero with the reason otherwise)
#        prepare.sh --check  exit 0 if already prepared, 1 if not; changes nothing
set -euo pipefail

: "${KIMI_MODEL:?set KIMI_MODEL to the Hugging Face checkpoint directory}"
: "${KIMI_NEURON_CHECKPOINT:?set KIMI_NEURON_CHECKPOINT to the directory for the converted checkpoint}"
format=${KIMI_CONVERT_FORMAT:-neuron-fp8}
serve_model=${KIMI_SERVE_MODEL:-$KIMI_MODEL}
home=${KIMI_NEURON_HOME:-$HOME/.cache/vllm-kimi-neuron}
port=${KIMI_PREPARE_PORT:-8011}
timeout_s=${KIMI_PREPARE_TIMEOUT_S:-14400}
read -r -a convert_args <<< "${KIMI_CONVERT_ARGS:-}"
read -r -a serve_args <<< "${VLLM_SERVE_ARGS:-}"

log() { printf 'prepare: %s\n' "$*" >&2; }

converted() { kimi-neuron verify --no-checksums "$KIMI_NEURON_CHECKPOINT" > /dev/null 2>&1; }

# What the compiled graphs depend on: the serve command, the converted weights' manifest and the
# versions of the packages that compile or load them (the same list the artifact keys use).
prepared_key() {
  {
    printf '%s\n' "$serve_model" "${serve_args[@]}"
    sha256sum < "$KIMI_NEURON_CHECKPOINT/kimi_neuron_manifest.json"
    python3 -c 'import json; from vllm_kimi_neuron.artifacts import package_versions as v; print(json.dumps(v(), sort_keys=True))'
  } | sha256sum | cut -c1-16
}

if [[ "${1:-}" == "--check" ]]; then
  if converted && [[ -f "$home/prepared/$(prepared_key)" ]]; then
    exit 0
  fi
  exit 1
fi

if converted; then
  log "converted checkpoint at $KIMI_NEURON_CHECKPOINT is complete; not converting"
else
  log "converting $KIMI_MODEL to $format at $KIMI_NEURON_CHECKPOINT (resumes an interrupted run)"
  kimi-neuron convert --model "$KIMI_MODEL" --out "$KIMI_NEURON_CHECKPOINT" --format "$format" "${convert_args[@]}"
  kimi-neuron verify "$KIMI_NEURON_CHECKPOINT"
fi

stamp="$home/prepared/$(prepared_key)"
if [[ -f "$stamp" ]]; then
  log "this configuration was compiled and started before ($stamp); nothing to do"
  exit 0
fi

status_file="$home/prepare-status.json"
mkdir -p "$home/prepared"
rm -f "$status_file"
log "warm start to compile: vllm serve $serve_model ${serve_args[*]}"
# The server's own command (serve.sh), on loopback; a stalled compile ends the warm start instead
# of waiting out the timeout.
KIMI_MODEL="$serve_model" KIMI_PORT="$port" KIMI_NEURON_STATUS_FILE="$status_file" \
  KIMI_NEURON_STALL_ACTION=exit bash "$(dirname "${BASH_SOURCE[0]}")/serve.sh" --host 127.0.0.1 &
server=$!
trap 'kill -TERM "$server" 2> /dev/null || true; wait "$server" 2> /dev/null || true' EXIT

# Wait for ready (0), failed (1) or stopped (5); a server that died reads as failed.
rc=3
deadline=$((SECONDS + timeout_s))
while ((SECONDS < deadline)); do
  rc=0
  kimi-neuron status --file "$status_file" > /dev/null 2>&1 || rc=$?
  if [[ $rc -eq 0 || $rc -eq 1 || $rc -eq 5 ]] || ! kill -0 "$server" 2> /dev/null; then
    break
  fi
  sleep 5
done
kimi-neuron status --file "$status_file" >&2 || true
kill -TERM "$server" 2> /dev/null || true
wait "$server" || true
trap - EXIT
if [[ $rc -ne 0 ]]; then
  log "the warm start did not become ready (kimi-neuron status exit $rc); nothing was marked prepared"
  exit 1
fi
printf '%s\n' "$serve_model ${serve_args[*]}" > "$stamp"
log "compiled and started once; later starts reuse the artifacts under $home/compiled"
