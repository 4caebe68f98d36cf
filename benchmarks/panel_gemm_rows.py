"""SmolLM2-135M's 121 linear layers (30 x qkv, o, gate_up, down, and lm_head), one call
each, fp32, 2 threads: our panel GEMM (kernels/csrc/gemm_cpu.cpp) against F.linear at 1-64
rows; median of 7 passes, with GFLOP/s and the weights' bytes read per second.

    PYTHONPATH=. .venv/bin/python benchmarks/panel_gemm_rows.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from splitserve.kernels import cpu_ext

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in) of one layer
VOCAB = 49152


def median_s(fn: Callable[[], None], passes: int = 7) -> float:
    fn()  # warm-up
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(2)
    weights = [torch.randn(o, i) * 0.02 for o, i in SHAPES] * 30 + [torch.randn(VOCAB, 576) * 0.02]
    packed = [cpu_ext.pack_linear_weight(w) for w in weights]
    flop_per_row = sum(2 * w.numel() for w in weights)
    weight_bytes = sum(w.numel() * 4 for w in weights)
    for rows in (1, 4, 8, 16, 32, 64):
        xs = [torch.randn(rows, w.shape[1]) for w in weights]

        def panel(xs: list[torch.Tensor] = xs) -> None:
            for x, w, p in zip(xs, weights, packed, strict=True):
                cpu_ext.linear_packed(x, p, None, w.shape[0])

        def library(xs: list[torch.Tensor] = xs) -> None:
            for x, w in zip(xs, weights, strict=True):
                F.linear(x, w)

        cells = []
        for name, fn in (("panel", panel), ("F.linear", library)):
            s = median_s(fn)
            cells.append(f"{name} {s * 1e3:.1f} ms {flop_per_row * rows / s / 1e9:.0f} GFLOP/s "
                         f"{weight_bytes / s / 1e9:.1f} GB/s")
        print(f"{rows:3d} rows: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
