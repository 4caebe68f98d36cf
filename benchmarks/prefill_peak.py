"""Prefill against the machine's GEMM rate: is a CPU prefill at the GEMM peak?

    PYTHONPATH=. .venv/bin/python benchmarks/prefill_peak.py [--dtype float32] [--threads 2]

Prints torch.mm's rate at a large square shape and at SmolLM2's MLP shape (the library
GEMM the engine's prefill runs on), then the engine's one-step prefill of 256 and 1,024
random tokens (median of 5 after a warm-up) as GFLOP/s: the linear layers' 2 x
(their weights) per token plus one token's logits, and with the causal attention's
2 x n^2 x (heads x head_dim) x layers added.
"""

from __future__ import annotations

import random
import statistics
import sys
import time

import torch
from engine_args import engine_parser


def mm_gflops(m: int, n: int, k: int, dtype: torch.dtype, reps: int = 10) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * m * n * k / statistics.median(times) / 1e9


def main() -> int:
    ap = engine_parser(__doc__, dtype="float32")
    args = ap.parse_args()

    from splitserve.common.sampling_params import SamplingParams
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype,
                                    num_threads=args.threads, num_kv_blocks=512,
                                    max_num_seqs=4))
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    print(f"torch.mm {args.dtype}, {args.threads} threads: 2048^3 "
          f"{mm_gflops(2048, 2048, 2048, dtype):.0f} GFLOP/s, 256x1536x576 "
          f"{mm_gflops(256, 1536, 576, dtype, 20):.0f}, 1024x1536x576 "
          f"{mm_gflops(1024, 1536, 576, dtype, 20):.0f}")
    a = engine.arch
    q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    per_layer = a.hidden_size * (q + 2 * kv) + q * a.hidden_size \
        + 3 * a.hidden_size * a.intermediate_size  # qkv, o, gate/up/down
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    for n in (256, 1024):
        times = []
        for r in range(6):
            engine.add_request([rng.randrange(100, 30000) for _ in range(n)], params,
                               f"prefill-{n}-{r}")
            start = time.perf_counter()
            engine.step()  # the whole prompt in one step (within max_num_batched_tokens)
            times.append(time.perf_counter() - start)
            while engine.has_unfinished():
                engine.step()
        seconds = statistics.median(times[1:])
        linear = 2 * per_layer * a.num_layers * n + 2 * a.vocab_size * a.hidden_size
        attention = 2 * n * n * q * a.num_layers  # causal QK^T and PV: half of 4 n^2 q
        print(f"prefill {n} tokens: {seconds * 1e3:.0f} ms; linear layers "
              f"{linear / seconds / 1e9:.0f} GFLOP/s, with attention "
              f"{(linear + attention) / seconds / 1e9:.0f} GFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
