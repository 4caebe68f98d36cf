"""The bf16 panels' time over the fp32 panels' on the same layers, interleaved: a ratio the
VM's speed drift (often 20-40% within minutes) leaves alone, where two timings minutes
apart do not.

    PYTHONPATH=. .venv/bin/python benchmarks/bf16_panels_vs_fp32.py [--rows 16,64,384,2048]
        [--threads 2] [--rounds 5]

SmolLM2-135M's 120 layer linears (30 x qkv, o, gate_up, down; no lm_head), one call each on
our panels (kernels/csrc/gemm_cpu.cpp), fp32 then bf16, per round (the median of 30 passes
at <= 16 rows, else 3); prints per row count the medians and the bf16 / fp32 ratio of each
round. To compare two commits, run it from a worktree of each in turn (PYTHONPATH=<tree>).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from linear_paths import SHAPES, median_s  # benchmarks/ is the script's path

from splitserve.kernels import cpu_ext


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="16,64,384,2048")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"gemm ISA: fp32 {cpu_ext.gemm_isa(torch.float32)}, "
          f"bf16 {cpu_ext.gemm_isa(torch.bfloat16)}; {args.threads} threads")
    fp32 = [torch.randn(o, i) * 0.02 for o, i in SHAPES] * 30
    bf16 = [w.to(torch.bfloat16) for w in fp32]
    packed = {torch.float32: [cpu_ext.pack_linear_weight(w) for w in fp32],
              torch.bfloat16: [cpu_ext.pack_linear_weight(w) for w in bf16]}

    def layers(xs: list[torch.Tensor], dtype: torch.dtype) -> None:
        for x, p, w in zip(xs, packed[dtype], fp32, strict=True):
            cpu_ext.linear_packed(x, p, None, w.shape[0])

    with torch.inference_mode():
        for rows in (int(r) for r in args.rows.split(",")):
            x32 = [torch.randn(rows, w.shape[1]) for w in fp32]
            x16 = [x.to(torch.bfloat16) for x in x32]
            passes = 30 if rows <= 16 else 3
            t32, t16 = [], []
            for _ in range(args.rounds):
                t32.append(median_s(lambda xs=x32: layers(xs, torch.float32), passes))
                t16.append(median_s(lambda xs=x16: layers(xs, torch.bfloat16), passes))
            ratios = [b / a for a, b in zip(t32, t16, strict=True)]
            print(f"rows {rows:5d}: fp32 {statistics.median(t32) * 1e3:8.2f} ms  bf16 "
                  f"{statistics.median(t16) * 1e3:8.2f} ms  bf16/fp32 median "
                  f"{statistics.median(ratios):.3f} (rounds "
                  f"{' '.join(f'{r:.2f}' for r in ratios)})", flush=True)


if __name__ == "__main__":
    main()
