#!/bin/bash
cd /work/main
for round in 1 2; do
  for side in free pinned; do
    if [ $side = pinned ]; then export HACK_SERVE_CPUS=1 HACK_ENGINE_CPUS=0; else unset HACK_SERVE_CPUS HACK_ENGINE_CPUS; fi
    echo "=== round $round $side $(date +%T)"
    .venv/bin/python -m splitserve.cli bench peer --precisions bf16 --threads 1 --num-requests 16 \
      --concurrency 16 --single-stream 8 --out /tmp/s26/ab/pin_r${round}_${side}.json \
      > /tmp/s26/ab/pin_r${round}_${side}.txt 2>&1
    grep -E "colocated|offline|step after" /tmp/s26/ab/pin_r${round}_${side}.txt
  done
done
echo DONE $(date +%T)
