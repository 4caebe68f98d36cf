#!/usr/bin/env bash
# Proof on a fresh machine: clone this repository's committed HEAD into a new folder, with a
# new venv, an empty pip cache and empty SplitServe / torch-extension / Hugging Face caches,
# then run the README's two commands and print how long each took:
#
#   make test                              (sets everything up, runs the suite)
#   make run RUN_ARGS=--exit-after-demo    (the local service on the default model; the demo
#                                           streams one answer, then the service stops)
#
# SPLITSERVE_UNLOCKED=1 installs the newest releases of every dependency instead of the
# lock (requirements/dev.lock). KEEP=1 keeps the folder afterwards. Uses ports 50051/8000.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/splitserve-fresh.XXXXXX")
cleanup() { [ "${KEEP:-0}" = 1 ] && echo "kept $WORK" || rm -rf "$WORK"; }
trap cleanup EXIT

export PIP_CACHE_DIR="$WORK/cache/pip"
export SPLITSERVE_CACHE="$WORK/cache/splitserve"
export TORCH_EXTENSIONS_DIR="$WORK/cache/torch_extensions"
export HF_HOME="$WORK/cache/huggingface"
export XDG_CACHE_HOME="$WORK/cache/xdg"
unset VIRTUAL_ENV PYTHONPATH

stamp() { date -u +%H:%M:%S; }
timed() {  # timed NAME CMD...: run, report wall seconds and the exit status
  local name=$1 start end status
  shift
  echo "=== [$(stamp)] $name: $*"
  start=$(date +%s)
  set +e
  "$@"
  status=$?
  set -e
  end=$(date +%s)
  echo "=== [$(stamp)] $name: exit $status after $((end - start)) s"
  RESULTS+=("$name: exit $status, $((end - start)) s")
  return "$status"
}

RESULTS=()
echo "fresh-machine check of $(git -C "$REPO" rev-parse --short HEAD) in $WORK"
echo "python: $(python3 --version 2>&1); lock: $([ "${SPLITSERVE_UNLOCKED:-0}" = 1 ] && echo newest releases || echo requirements/dev.lock)"
git clone -q "$REPO" "$WORK/splitserve"
cd "$WORK/splitserve"
status=0
timed "make test" make test || status=$?
timed "make run --exit-after-demo" make run RUN_ARGS=--exit-after-demo || status=$?
echo "installed: $(.venv/bin/python -m pip list 2>/dev/null \
  | grep -iE '^(torch|transformers|kernels|ray|grpcio|protobuf|triton|redis) ' \
  | awk '{printf "%s %s, ", $1, $2}')"
echo "=== summary"
printf '%s\n' "${RESULTS[@]}"
exit "$status"
