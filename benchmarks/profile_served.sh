#!/bin/bash
# Where the served time goes: router + 1 decode worker (colocated, 2 threads, bf16),
# issue 10's workload, both processes sampled by py-spy at 50 Hz for 30 s mid-run
# (PROFILE=1; pip install py-spy, or PY_SPY=/path/to/py-spy). DEXTRA: more decode flags.
set -e
cd "$(dirname "$0")/.."
S="${SBIN:-.venv/bin/splitserve}"
L=/tmp/prof; rm -rf $L; mkdir -p $L
$S router --port 0 --http-port 0 --local-prefill-threshold 100000 > $L/router.out 2>$L/router.err &
RP=$!
for i in $(seq 100); do grep -q READY $L/router.out && break; sleep 0.2; done
read _ _ ADDR _ CL _ HTTP < $L/router.out
$S decode --cluster $CL --threads 2 --dtype bfloat16 --num-kv-blocks 2048 ${DEXTRA} > $L/decode.out 2>$L/decode.err &
DP=$!
for i in $(seq 300); do grep -q READY $L/decode.out && break; sleep 0.2; done
sleep 2
$S bench serve --target grpc://$ADDR --workload fixed --input-len 256 --output-len 128 --concurrency 16 --num-requests ${NUM:-64} --seed 1 --no-progress > $L/bench.txt 2>&1 &
BP=$!
if [ "${PROFILE:-1}" = 1 ]; then
  sleep 6
  ${PY_SPY:-py-spy} record -r 50 -d 30 -f raw -o $L/router.txt -p $RP --threads --idle >/dev/null 2>&1 &
  ${PY_SPY:-py-spy} record -r 50 -d 30 -f raw -o $L/decode.txt -p $DP --threads --idle >/dev/null 2>&1 &
fi
wait $BP
sleep 2
kill -INT $DP $RP 2>/dev/null || true; sleep 2; kill -9 $DP $RP 2>/dev/null || true
grep -E "output token throughput|^TTFT|^TPOT|requests:" $L/bench.txt
