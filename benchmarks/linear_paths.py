"""SmolLM2-135M's 121 linear layers (30 x qkv, o, gate_up, down, and lm_head), one call each,
at decode-sized row counts, by every path this CPU has: our panels (kernels/csrc/gemm_cpu.cpp:
AVX-512, AVX512-BF16 or AVX2), oneDNN's packed layout, and F.linear; per dtype, the median
of 7 passes, with the weights' bytes read per second, GFLOP/s and each path's ratio to
F.linear.
Says which instruction sets the CPU has, since the panels' code path depends on them.

    PYTHONPATH=. .venv/bin/python benchmarks/linear_paths.py [--dtypes float32,bfloat16]
        [--rows 1,4,16,64] [--threads 2] [--paths panels,oneDNN,F.linear] [--no-lm-head]

--no-lm-head leaves out lm_head (49,152 x 576), which a prefill chunk runs on its last
tokens only: the shapes of a prefill chunk's rows. Ratios are to F.linear, or to the first
path timed when --paths leaves it out.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from splitserve.kernels import cpu_ext

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in) of one layer
VOCAB = 49152


def median_s(fn: Callable[[], object], passes: int = 7) -> float:
    fn()  # warm-up
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_flags() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")
                return " ".join(f for f in wanted if f in flags) or "none of " + ",".join(wanted)
    return "unknown"


def paths(dtype: torch.dtype, weights: list[torch.Tensor]
          ) -> dict[str, Callable[[list[torch.Tensor]], object]]:
    """name -> a function of the inputs that calls every layer once on that path."""
    out: dict[str, Callable[[list[torch.Tensor]], object]] = {}
    supported = cpu_ext.gemm_supported() if dtype == torch.float32 else cpu_ext.gemm_bf16_supported()
    if supported:
        packed = [cpu_ext.pack_linear_weight(w) for w in weights]
        out["panels"] = lambda xs: [cpu_ext.linear_packed(x, p, None, w.shape[0])
                                    for x, p, w in zip(xs, packed, weights, strict=True)]
    onednn = dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if torch.backends.mkldnn.is_available() and onednn:
        reordered = [torch.ops.mkldnn._reorder_linear_weight(w, 32) for w in weights]
        out["oneDNN"] = lambda xs: [torch.ops.mkldnn._linear_pointwise(x, r, None, "none", [], "")
                                    for x, r in zip(xs, reordered, strict=True)]
    out["F.linear"] = lambda xs: [F.linear(x, w) for x, w in zip(xs, weights, strict=True)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rows", default="1,4,16,64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--paths", default="",
                    help="comma-separated paths to time (default: all; F.linear in bf16 "
                         "without a bf16 GEMM takes ~30 s a pass at 2,048 rows)")
    ap.add_argument("--no-lm-head", action="store_true",
                    help="the 120 layers only: a prefill chunk runs lm_head on its last "
                         "tokens, not on every row")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"CPU flags: {cpu_flags()}; {args.threads} threads; panels: fp32 "
          f"{cpu_ext.gemm_supported()}, bf16 {cpu_ext.gemm_bf16_supported()}")
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        weights = [(torch.randn(o, i) * 0.02).to(dtype) for o, i in SHAPES] * 30
        if not args.no_lm_head:
            weights.append((torch.randn(VOCAB, 576) * 0.02).to(dtype))
        weight_bytes = sum(w.numel() * w.element_size() for w in weights)
        flop_per_row = sum(2 * w.numel() for w in weights)
        by_path = paths(dtype, weights)
        if args.paths:
            by_path = {p: fn for p, fn in by_path.items() if p in args.paths.split(",")}
            if not by_path:
                ap.error(f"--paths {args.paths}: none of them runs here for {name} "
                         f"(this CPU's paths: {', '.join(paths(dtype, weights[:1]))})")
        base = "F.linear" if "F.linear" in by_path else next(iter(by_path))
        for rows in (int(r) for r in args.rows.split(",")):
            xs = [torch.randn(rows, w.shape[1]).to(dtype) for w in weights]
            times = {}
            with torch.inference_mode():
                for path, fn in by_path.items():
                    times[path] = median_s(lambda fn=fn, xs=xs: fn(xs))
            line = "  ".join(f"{p} {t * 1e3:7.2f} ms ({weight_bytes / t / 1e9:5.1f} GB/s, "
                             f"{flop_per_row * rows / t / 1e9:4.0f} GFLOP/s, "
                             f"{times[base] / t:4.2f}x {base})" for p, t in times.items())
            print(f"{name:8s} {rows:4d} rows: {line}", flush=True)


if __name__ == "__main__":
    main()
