"""Benchmark: Triton paged decode attention vs copy bandwidth, SDPA and FlashInfer.

    python benchmarks/decode_attention.py                 # all shapes, bf16, block size 16
    python benchmarks/decode_attention.py --shapes 64x4096 --num-splits 2

Per shape it prints the time per call, the achieved bandwidth (bytes of Q, K and V read,
divided by the time), that bandwidth as a fraction of a device-to-device copy measured in
the same run, and the speedup over torch SDPA on the same KV already gathered into a dense
tensor (gather not timed: a baseline that favors SDPA), and over FlashInfer if importable.
Every kernel's output is checked against the plain-torch reference before it is timed.
Needs CUDA; `--allow-cpu` runs a tiny smoke configuration in the Triton interpreter.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 2e-5}


@dataclass(frozen=True)
class Shape:
    num_seqs: int
    context_len: int
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128

    def __post_init__(self) -> None:
        assert self.num_heads % self.num_kv_heads == 0 and self.context_len >= 1

    @property
    def name(self) -> str:
        return f"{self.num_seqs}x{self.context_len}"

    def bytes_read(self, dtype: torch.dtype) -> int:
        elem = torch.tensor([], dtype=dtype).element_size()
        kv = 2 * self.num_seqs * self.context_len * self.num_kv_heads * self.head_dim
        q = self.num_seqs * self.num_heads * self.head_dim
        return (kv + q) * elem


GPU_SHAPES = [Shape(64, 4096), Shape(32, 4096), Shape(8, 8192), Shape(4, 16384), Shape(1, 32768),
              Shape(64, 1024), Shape(128, 2048)]
CPU_SHAPES = [Shape(2, 100, 8, 2, 64), Shape(3, 257, 4, 1, 80)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--shapes", nargs="*", default=None,
                   help="subset by name, e.g. 64x4096 (default: all for the device)")
    p.add_argument("--num-splits", type=int, default=None, help="force split count (default: heuristic)")
    p.add_argument("--allow-cpu", action="store_true",
                   help="without CUDA, run tiny shapes in the Triton interpreter (smoke test)")
    p.add_argument("--copy-mib", type=int, default=1024, help="buffer size for the copy bandwidth")
    return p.parse_args(argv)


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Mean milliseconds per call; on CUDA via triton's do_bench (which flushes L2)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=200))
    fn()
    start = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - start) / 3 * 1e3


def copy_bandwidth_gbs(device: torch.device, mib: int) -> float:
    """Device-to-device copy, counting bytes read plus bytes written."""
    n = mib * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * n / ms / 1e6


def make_inputs(shape: Shape, dtype: torch.dtype, block_size: int, device: torch.device):
    gen = torch.Generator(device=device).manual_seed(0)
    blocks_per_seq = -(-shape.context_len // block_size)
    num_blocks = shape.num_seqs * blocks_per_seq + 1
    cache_shape = (num_blocks, block_size, shape.num_kv_heads, shape.head_dim)
    k_cache = torch.randn(cache_shape, generator=gen, device=device, dtype=dtype)
    v_cache = torch.randn(cache_shape, generator=gen, device=device, dtype=dtype)
    ids = torch.randperm(num_blocks, generator=gen, device=device)[: shape.num_seqs * blocks_per_seq]
    table = ids.view(shape.num_seqs, blocks_per_seq).to(torch.int32)
    lens = torch.full((shape.num_seqs,), shape.context_len, dtype=torch.int32, device=device)
    q = torch.randn(shape.num_seqs, shape.num_heads, shape.head_dim, generator=gen, device=device, dtype=dtype)
    return q, k_cache, v_cache, table, lens


def sdpa_runner(q, k_cache, v_cache, table, shape: Shape, scale: float) -> Callable[[], torch.Tensor]:
    from splitserve.kernels.reference import gather_kv

    n = table.shape[1]
    # [num_seqs, kv_heads, context_len, d], gathered once outside the timed region
    k = gather_kv(k_cache, table, n)[:, : shape.context_len].transpose(1, 2).contiguous()
    v = gather_kv(v_cache, table, n)[:, : shape.context_len].transpose(1, 2).contiguous()
    q4 = q.unsqueeze(2)  # [num_seqs, num_heads, 1, d]
    return lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True).squeeze(2)


def flashinfer_runner(q, k_cache, v_cache, table, lens, shape: Shape, block_size: int, scale: float):
    """None when flashinfer is missing or its API does not match; else a timed callable."""
    try:
        import flashinfer
    except ImportError:
        return None
    device = q.device
    blocks = table.shape[1]
    indptr = torch.arange(0, shape.num_seqs + 1, device=device, dtype=torch.int32) * blocks
    last = ((lens - 1) % block_size + 1).to(torch.int32)
    workspace = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
    wrapper.plan(indptr, table.reshape(-1).contiguous(), last, shape.num_heads, shape.num_kv_heads,
                 shape.head_dim, block_size, data_type=q.dtype, sm_scale=scale)
    return lambda: wrapper.run(q, (k_cache, v_cache))


def check(name: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    tol = TOL[expected.dtype]
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol,
                               msg=lambda m: f"{name} disagrees with the reference: {m}")


def bench_shape(shape: Shape, args: argparse.Namespace, device: torch.device, copy_gbs: float) -> None:
    from splitserve.kernels import paged_attention as pa
    from splitserve.kernels import reference as ref

    dtype = DTYPES[args.dtype]
    q, k_cache, v_cache, table, lens = make_inputs(shape, dtype, args.block_size, device)
    scale = shape.head_dim**-0.5
    expected = ref.paged_decode_attention(q, k_cache, v_cache, table, lens, scale)
    out = torch.empty_like(q)
    scratch = pa.alloc_scratch(shape.num_seqs, shape.num_heads, shape.head_dim, device)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    splits = args.num_splits or pa.choose_num_splits(shape.num_seqs, shape.num_kv_heads, shape.context_len, sms)

    def triton_call() -> torch.Tensor:
        return pa.paged_decode_attention(q, k_cache, v_cache, table, lens, scale, out=out,
                                         scratch=scratch, num_splits=splits)

    check("triton", triton_call(), expected)
    ms = time_ms(triton_call, device)
    gbs = shape.bytes_read(dtype) / ms / 1e6
    line = (f"{shape.name:>9} H={shape.num_heads}/{shape.num_kv_heads} d={shape.head_dim} "
            f"splits={splits:<2} triton {ms * 1e3:9.1f} us  {gbs:7.1f} GB/s  "
            f"{gbs / copy_gbs:5.1%} of copy")
    sdpa = sdpa_runner(q, k_cache, v_cache, table, shape, scale)
    check("sdpa", sdpa(), expected)
    line += f"  | sdpa(dense) {time_ms(sdpa, device) / ms:5.2f}x"
    try:
        fi = flashinfer_runner(q, k_cache, v_cache, table, lens, shape, args.block_size, scale)
        if fi is not None:
            check("flashinfer", fi(), expected)
            line += f"  | flashinfer {time_ms(fi, device) / ms:5.2f}x"
    except Exception as exc:  # an API drift in an optional baseline must not stop the run
        line += f"  | flashinfer skipped ({type(exc).__name__}: {str(exc)[:80]})"
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if torch.cuda.is_available():
        device, shapes, copy_mib = torch.device("cuda"), GPU_SHAPES, args.copy_mib
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    elif args.allow_cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels.paged_attention loads
        device, shapes, copy_mib = torch.device("cpu"), CPU_SHAPES, min(args.copy_mib, 64)
        print("device: CPU (Triton interpreter; numbers are a smoke test, not a benchmark)")
    else:
        print("decode_attention benchmark needs CUDA (pass --allow-cpu for a CPU smoke run)")
        return 0
    if args.shapes:
        shapes = [s for s in shapes if s.name in set(args.shapes)]
    copy_gbs = copy_bandwidth_gbs(device, copy_mib)
    print(f"dtype={args.dtype} block_size={args.block_size} copy bandwidth {copy_gbs:.1f} GB/s "
          "(read+write); ratios are baseline time / triton time (>1: triton faster)")
    for shape in shapes:
        bench_shape(shape, args, device, copy_gbs)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
