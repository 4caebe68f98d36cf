#!/bin/bash
# `splitserve bench serve` against NVIDIA aiperf on the same workload (issue 14: the two
# tools' numbers within 15% at concurrency 1 and 4, measured on a quiet machine).
#
#   benchmarks/aiperf_vs_bench.sh /path/to/aiperf      (or AIPERF=/path/to/aiperf)
#
# aiperf is not a dependency of SplitServe: install it into a venv of its own, e.g.
#   python3 -m venv /tmp/aiperf-venv && /tmp/aiperf-venv/bin/pip install aiperf
# (checked with aiperf 0.13.0).
#
# Starts router + 1 decode worker on SmolLM2-135M (loopback only), then for each
# concurrency runs `bench serve` and then `aiperf profile` against the router's
# /v1/chat/completions, streaming, with the same workload: NUM requests of INPUT_LEN prompt
# tokens (bench serve: that many one-token words; aiperf: that many tokens of its corpus,
# both plus the chat template) and exactly OUTPUT_LEN output tokens (ignore_eos,
# temperature 0), WARMUP unmeasured requests first, a fresh seed per run so that no prompt
# repeats (the prefix cache). aiperf counts tokens by the server's usage, as bench serve
# does (--use-server-token-count). Prints `bench compare` of each pair (A = bench serve,
# B = aiperf: B/A is the ratio), both tools' token totals and the CPU time each client
# process tree used: on a machine with few cores the client competes with a CPU-served
# model (on a 2-vCPU VM aiperf's processes used ~40 s of CPU, start-up included, for a
# 60 s run; bench serve under 1 s), so measure where cores are idle, or pin (knobs below).
# Definitions and how aiperf's metrics map onto ours: splitserve/bench/aiperf_format.py
# (aiperf's "ITL" is our TPOT; our ITL is its inter-chunk latency).
#
# Knobs (environment): CONCURRENCIES ("1 4"), NUM (16), INPUT_LEN (128), OUTPUT_LEN (64),
# WARMUP (2), THREADS (2, decode worker's CPU threads), DEXTRA (more decode flags),
# SERVER_CPUS / CLIENT_CPUS (taskset CPU lists for the deployment / both clients, e.g.
# "0-3" and "4-7": keeps aiperf's service processes off the model's cores),
# OUT (/tmp/aiperf_vs_bench: logs, results, aiperf's artifacts), SBIN (splitserve CLI).
set -euo pipefail
cd "$(dirname "$0")/.."
AIPERF="${1:-${AIPERF:-}}"
if [ -z "$AIPERF" ] || ! command -v "$AIPERF" >/dev/null; then
  echo "usage: $0 /path/to/aiperf   (or AIPERF=/path/to/aiperf $0)" >&2
  exit 2
fi
S="${SBIN:-.venv/bin/splitserve}"
SERVER=() CLIENT=()
[ -n "${SERVER_CPUS:-}" ] && SERVER=(taskset -c "$SERVER_CPUS")
[ -n "${CLIENT_CPUS:-}" ] && CLIENT=(taskset -c "$CLIENT_CPUS")
PY="$(dirname "$S")/python"
CONCURRENCIES="${CONCURRENCIES:-1 4}"
NUM="${NUM:-16}" INPUT_LEN="${INPUT_LEN:-128}" OUTPUT_LEN="${OUTPUT_LEN:-64}"
WARMUP="${WARMUP:-2}" THREADS="${THREADS:-2}"
OUT="${OUT:-/tmp/aiperf_vs_bench}"
mkdir -p "$OUT"; rm -rf "$OUT"/aiperf-c* "$OUT"/bench-c*
TIMEFORMAT="%U %S"  # `time`: the client's user and system CPU seconds (with its children)

PIDS=()
cleanup() {
  [ ${#PIDS[@]} -eq 0 ] && return
  kill -INT "${PIDS[@]}" 2>/dev/null || true; sleep 2; kill -9 "${PIDS[@]}" 2>/dev/null || true
}
trap cleanup EXIT

wait_ready() {  # file, seconds
  for _ in $(seq $(($2 * 5))); do grep -q READY "$1" && return 0; sleep 0.2; done
  echo "no READY in $1 after $2 s; see ${1%.out}.err" >&2; return 1
}

# No prefill worker: every prompt is prefilled on the decode worker.
"${SERVER[@]}" $S router --host 127.0.0.1 --port 0 --http-port 0 --local-prefill-threshold 100000 \
  > "$OUT/router.out" 2> "$OUT/router.err" &
PIDS+=($!)
wait_ready "$OUT/router.out" 60
read -r _ _ _ _ CLUSTER _ HTTP < "$OUT/router.out"
"${SERVER[@]}" $S decode --host 127.0.0.1 --cluster "$CLUSTER" --threads "$THREADS" ${DEXTRA:-} \
  > "$OUT/decode.out" 2> "$OUT/decode.err" &
PIDS+=($!)
wait_ready "$OUT/decode.out" 300
sleep 2
MODEL=$("$PY" -c "import json, urllib.request; print(json.load(urllib.request.urlopen(
  'http://$HTTP/v1/models'))['data'][0]['id'])")
TOKENIZER=$("$PY" -c "from splitserve.engine.model_files import resolve_model
print(resolve_model('smollm2-135m'))")  # the served model's HF dir: aiperf's tokenizer
echo "router http://$HTTP, model $MODEL, $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"

for C in $CONCURRENCIES; do
  BENCH="$OUT/bench-c$C.json" ART="$OUT/aiperf-c$C"
  { time "${CLIENT[@]}" $S bench serve --target "http://$HTTP" --api chat --label "bench serve c=$C" \
    --workload fixed --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" \
    --num-requests "$NUM" --concurrency "$C" --warmup "$WARMUP" --seed $((100 + C)) \
    --out "$BENCH" --no-progress > "$OUT/bench-c$C.txt" 2>&1; } 2> "$OUT/bench-c$C.cpu"
  { time "${CLIENT[@]}" "$AIPERF" profile --model "$MODEL" --url "http://$HTTP" \
    --endpoint-type chat --streaming --tokenizer "$TOKENIZER" --use-server-token-count \
    --isl "$INPUT_LEN" --isl-stddev 0 --osl "$OUTPUT_LEN" --osl-stddev 0 \
    --extra-inputs ignore_eos:true --extra-inputs temperature:0 \
    --request-count "$NUM" --concurrency "$C" --warmup-request-count "$WARMUP" \
    --num-dataset-entries $((NUM + WARMUP)) --random-seed $((200 + C)) \
    --ui none --no-server-metrics --no-gpu-telemetry --output-artifact-dir "$ART" \
    > "$OUT/aiperf-c$C.txt" 2>&1; } 2> "$OUT/aiperf-c$C.cpu"
  echo; echo "=== concurrency $C: A = bench serve, B = aiperf ==="
  $S bench compare "$BENCH" "$ART/profile_export_aiperf.json"
  "$PY" - "$BENCH" "$OUT/bench-c$C.cpu" "$ART/profile_export_aiperf.json" "$OUT/aiperf-c$C.cpu" <<'EOF'
import sys
from pathlib import Path
from splitserve.bench import report
for name, path, cpu in zip(("bench serve", "aiperf"), sys.argv[1::2], sys.argv[2::2]):
    s = report.load(path)["summary"]
    user, system = map(float, Path(cpu).read_text().split()[-2:])
    print(f"{name}: {s['total_prompt_tokens']} prompt + {s['total_output_tokens']} output "
          f"tokens; client CPU {user + system:.1f} s over a {s['duration_s']:.1f} s run "
          f"(with start-up)")
EOF
done
