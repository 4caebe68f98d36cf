"""The engine offline with each KV cache dtype, interleaved: throughput on the `bench peer`
workload and the batch-16 decode step, paired by round.

    PYTHONPATH=. .venv/bin/python benchmarks/kv_cache_dtype_ab.py [--dtype float32]
        [--threads 2] [--kv auto,float16,bfloat16] [--rounds 3] [--num-requests 32]

One engine per KV dtype (`max_num_seqs` 16, 2,048 blocks), built up front. Each round takes
fresh prompts of the workload (256 tokens in, 128 out, seed 100 + round: no engine has them
in its prefix cache) and runs them on every engine in turn, then times each engine's decode
step at batch 16 and context 320 (median of 16 steps). Prints every round and the medians,
with each dtype's ratios to the first one's paired by round (this VM's speed drifts by tens
of percent over minutes); asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics

from engine_args import engine_parser

from splitserve.bench import peer
from splitserve.bench.offline import decode_step_ms
from splitserve.engine.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine


def main() -> None:
    ap = engine_parser(__doc__, dtype="float32")
    ap.add_argument("--kv", default="auto,float16,bfloat16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--num-requests", type=int, default=32)
    args = ap.parse_args()
    kinds = [k.strip() for k in args.kv.split(",") if k.strip()]
    engines = {kv: LLMEngine(EngineConfig(model=args.model, dtype=args.dtype,
                                          num_threads=args.threads, num_kv_blocks=2048,
                                          max_num_seqs=16, kv_cache_dtype=kv))
               for kv in kinds}
    workload = argparse.Namespace(input_len=256, output_len=128, concurrency=16,
                                  num_requests=args.num_requests)
    tok_s: dict[str, list[float]] = {kv: [] for kv in kinds}
    step_ms: dict[str, list[float]] = {kv: [] for kv in kinds}
    for r in range(args.rounds):
        prompts = peer.workload_prompts(engines[kinds[0]], workload, 100 + r)
        for kv, engine in engines.items():
            tok_s[kv].append(peer.run_offline(engine, prompts, workload)["output_throughput"])
            step_ms[kv].append(decode_step_ms(engine, 16, 320, steps=16))
            print(f"round {r} {kv:9s} {tok_s[kv][-1]:7.1f} tok/s, batch-16 decode step "
                  f"{step_ms[kv][-1]:6.2f} ms", flush=True)
    base = kinds[0]
    for kv in kinds:
        speed = statistics.median(a / b for a, b in zip(tok_s[kv], tok_s[base], strict=True))
        step = statistics.median(a / b for a, b in zip(step_ms[kv], step_ms[base], strict=True))
        print(f"{kv:9s} median {statistics.median(tok_s[kv]):7.1f} tok/s ({speed:.3f}x "
              f"{base}), step {statistics.median(step_ms[kv]):6.2f} ms ({step:.3f}x)")


if __name__ == "__main__":
    main()
