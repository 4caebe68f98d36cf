#!/usr/bin/env bash
# Runs the whole test suite. The Redis tests start their own redis-server on a free
# loopback port (tests/conftest.py), so nothing needs to be running beforehand.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec "$VENV/bin/python" -m pytest -q --durations=15 tests "$@"
