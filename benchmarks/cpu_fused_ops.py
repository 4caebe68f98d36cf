"""Benchmark: the fused CPU layer ops against the torch op chains they replace.

    PYTHONPATH=. python benchmarks/cpu_fused_ops.py [--dtype fp32|bf16] [--rows 16,256,2048]
        [--threads 2] [--repeat 9]

For each row count (16: a decode step; 256 and 2,048: prefill chunks), SmolLM2-135M's
shapes (hidden 576, intermediate 1,536, 9 query heads on 3 kv heads of 64): one call of
silu_and_mul, rms_norm, add_rms_norm_ and rotary_store_kv_ (fp32 cache), and the torch
chain each one replaces (F.silu(gate) * up; the model's RMSNorm; residual add then norm;
rotate_half rope then index_copy_ into the caches). Prints the median of --repeat timings
of 30 back-to-back calls (one per layer) in microseconds and chain / fused. Compare two
builds by running it from two checkouts (each JIT-builds its own kernels) with the same
arguments; `cpu_ext.gemm_isa` names the vector width the build has.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from splitserve.kernels import cpu_ext

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 576, 1536, 9, 3, 64, 30
EPS = 1e-5


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Median microseconds of LAYERS back-to-back calls."""
    fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(LAYERS):
            fn()
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples)


def torch_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, EPS)
    return weight * F.rms_norm(x.float(), weight.shape, None, EPS).to(x.dtype)


def cases(rows: int, dtype: torch.dtype) -> dict[str, tuple[Callable[[], object],
                                                             Callable[[], object]]]:
    g = torch.Generator().manual_seed(0)
    gate_up = torch.randn(rows, 2 * INTERMEDIATE, generator=g).to(dtype)
    out = torch.empty(rows, INTERMEDIATE, dtype=dtype)
    x = torch.randn(rows, HIDDEN, generator=g).to(dtype)
    residual = torch.randn(rows, HIDDEN, generator=g).to(dtype)
    weight = (torch.rand(HIDDEN, generator=g) + 0.5).to(dtype)
    width = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    qkv = torch.randn(rows, width, generator=g).to(dtype)
    angles = torch.rand(rows, HEAD_DIM, generator=g) * 6.28
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    num_blocks = rows // 16 + 2
    k_cache = torch.zeros(num_blocks, 16, KV_HEADS, HEAD_DIM, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.arange(rows, dtype=torch.int64)
    q_size, kv_size, half = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, HEAD_DIM // 2

    def chain_rope() -> None:
        qk = qkv[:, : q_size + kv_size].view(rows, HEADS + KV_HEADS, HEAD_DIM)
        rotated = torch.cat((-qk[..., half:], qk[..., :half]), dim=-1)
        qk.copy_(qk * cos[:, None] + rotated * sin[:, None])
        k = qkv[:, q_size: q_size + kv_size].reshape(rows, KV_HEADS, HEAD_DIM)
        v = qkv[:, q_size + kv_size:].reshape(rows, KV_HEADS, HEAD_DIM)
        k_cache.view(-1, KV_HEADS, HEAD_DIM).index_copy_(0, slots, k)
        v_cache.view(-1, KV_HEADS, HEAD_DIM).index_copy_(0, slots, v)

    def chain_add_norm() -> torch.Tensor:
        return torch_norm(residual + x, weight)

    return {
        "silu_and_mul": (lambda: F.silu(gate_up[:, :INTERMEDIATE]) * gate_up[:, INTERMEDIATE:],
                         lambda: cpu_ext.silu_and_mul(gate_up, out=out)),
        "rms_norm": (lambda: torch_norm(x, weight), lambda: cpu_ext.rms_norm(x, weight, EPS)),
        "add_rms_norm_": (chain_add_norm,
                          lambda: cpu_ext.add_rms_norm_(x, residual, weight, EPS)),
        "rotary_store_kv_": (chain_rope,
                             lambda: cpu_ext.rotary_store_kv_(qkv, cos, sin, k_cache, v_cache,
                                                              slots, HEADS, KV_HEADS,
                                                              HEAD_DIM)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--rows", default="16,256,2048")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=9)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    print(f"{args.dtype}, {args.threads} threads, {LAYERS} calls per timing; "
          f"this build's GEMM path: {cpu_ext.gemm_isa(dtype)}")
    print(f"{'op':<18}{'rows':>6}{'torch chain us':>16}{'fused us':>11}{'chain/fused':>13}")
    for rows in (int(r) for r in args.rows.split(",")):
        for name, (chain, fused) in cases(rows, dtype).items():
            t_chain, t_fused = timed(chain, args.repeat), timed(fused, args.repeat)
            print(f"{name:<18}{rows:>6}{t_chain:>16.0f}{t_fused:>11.0f}"
                  f"{t_chain / t_fused:>13.2f}")


if __name__ == "__main__":
    main()
