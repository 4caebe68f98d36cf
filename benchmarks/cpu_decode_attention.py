"""Benchmark: the C++ CPU paged decode kernel over a model's layers, cold KV, against DRAM.

    PYTHONPATH=. python benchmarks/cpu_decode_attention.py [--dtype fp32] [--seqs 16]
        [--context 320] [--layers 30] [--heads 9 --kv-heads 3 --head-dim 64] [--threads 2]

One decode step's attention: `--layers` calls, each on its own K/V cache (so, as in the
engine, a layer's KV is not in cache when it is read), `--seqs` sequences of `--context`
tokens whose blocks are shuffled over the pool (block size 16). Prints the median time of
the step's attention and the KV bytes read per second; `--hot` uses one cache for every
layer instead, which puts the KV in the last-level cache and leaves the kernel's compute.
Defaults: SmolLM2-135M's attention shape (9 query heads on 3 kv heads of 64) on 2 threads.
Compare two builds by running it from two checkouts (each JIT-builds its own kernel).
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from splitserve.kernels import cpu_ext

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BLOCK_SIZE = 16


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--cache-dtype", choices=sorted(DTYPES), default=None,
                   help="the K/V cache's dtype (default: --dtype; bf16 or fp16 under an fp32 "
                        "query is a half-width cache for a full-precision model)")
    p.add_argument("--seqs", type=int, default=16)
    p.add_argument("--context", type=int, default=320)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--hot", action="store_true", help="one cache for every layer")
    ns = p.parse_args()
    if cpu_ext.load() is None:
        raise SystemExit("the CPU kernels could not be built here")
    torch.set_num_threads(ns.threads)
    dtype = DTYPES[ns.dtype]
    cache_dtype = DTYPES[ns.cache_dtype or ns.dtype]
    blocks_per_seq = -(-ns.context // BLOCK_SIZE)
    num_blocks = ns.seqs * blocks_per_seq + 8

    def cache() -> torch.Tensor:
        return torch.randn(num_blocks, BLOCK_SIZE, ns.kv_heads, ns.head_dim).to(cache_dtype)

    shared = (cache(), cache()) if ns.hot else None
    caches = [shared or (cache(), cache()) for _ in range(ns.layers)]
    ids = list(range(num_blocks))
    random.Random(0).shuffle(ids)
    tables = torch.tensor([ids[i * blocks_per_seq:(i + 1) * blocks_per_seq]
                           for i in range(ns.seqs)], dtype=torch.int32)
    lens = torch.full((ns.seqs,), ns.context, dtype=torch.int32)
    q = torch.randn(ns.seqs, ns.heads, ns.head_dim).to(dtype)
    out = torch.empty_like(q)
    scale = ns.head_dim ** -0.5

    def step() -> float:
        start = time.perf_counter()
        for k, v in caches:
            cpu_ext.paged_decode_attention(q, k, v, tables, lens, scale, out=out)
        return time.perf_counter() - start

    step()
    seconds = sorted(step() for _ in range(ns.repeats))[ns.repeats // 2]
    kv_bytes = (ns.layers * 2 * ns.seqs * ns.context * ns.kv_heads * ns.head_dim
                * caches[0][0].element_size())
    cache = f" ({ns.cache_dtype} cache)" if ns.cache_dtype and ns.cache_dtype != ns.dtype else ""
    print(f"{ns.dtype}{cache} seqs={ns.seqs} context={ns.context} layers={ns.layers}"
          f"{' (hot)' if ns.hot else ''}: {seconds * 1e3:.2f} ms per step, "
          f"{kv_bytes / seconds / 1e9:.1f} GB/s of KV")


if __name__ == "__main__":
    main()
