#!/bin/bash
# Interleaved A/B: old (ea1f8e3, kernels hold the GIL) vs new (release it).
cd /work/main
for round in 1 2; do
  for threads in 2 1; do
    for side in old new; do
      if [ $side = old ]; then tree=/tmp/s26/wt_old; else tree=/work/main; fi
      echo "=== round $round threads $threads $side $(date +%T)"
      (cd $tree && PYTHONPATH=$tree /work/main/.venv/bin/python -m splitserve.cli bench peer \
        --precisions bf16 --threads $threads --num-requests 32 --concurrency 16 \
        --single-stream 8 --out /tmp/s26/ab/r${round}_t${threads}_${side}.json) \
        > /tmp/s26/ab/r${round}_t${threads}_${side}.txt 2>&1
      tail -12 /tmp/s26/ab/r${round}_t${threads}_${side}.txt
    done
  done
done
echo DONE $(date +%T)
