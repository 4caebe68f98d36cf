"""Where a CPU prefill step's time goes, against the GEMM peak of the model's layer shapes.

    .venv/bin/python benchmarks/cpu_prefill_breakdown.py [--dtype bfloat16|float32]
                                                          [--threads 2] [--prompts 16]

The engine as `bench peer` builds it (`max_num_seqs` 16, the default chunk budget) takes
--prompts of the peer workload's prompts (256 tokens) at once; the torch profiler records
its first two steps (prefill chunks), and the table shows the ops by self time (aten::mm
is the linear layers; _scaled_dot_product_flash_attention_for_cpu the prompts'
attention). Then F.linear alone on SmolLM2-135M's layer shapes (2,048 rows: a prefill
chunk; 16 rows: a decode step), medians of several calls: the GEMM rate the linear layers
can reach on this machine. Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from splitserve.bench.peer import offline_engine, warm_up, workload_prompts
from splitserve.common.sampling_params import SamplingParams

# (rows, in features, out features): qkv, gate+up and down projections of SmolLM2-135M
SHAPES = ((2048, 576, 960), (2048, 576, 3072), (2048, 1536, 576), (16, 576, 3072),
          (16, 1536, 576))


def gemm_rates(dtype: torch.dtype, threads: int) -> None:
    torch.set_num_threads(threads)
    for rows, k, n in SHAPES:
        x, w = torch.randn(rows, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        for _ in range(3):
            F.linear(x, w)
        times = []
        for _ in range(7 if rows > 16 else 200):
            started = time.perf_counter()
            F.linear(x, w)
            times.append(time.perf_counter() - started)
        seconds = statistics.median(times)
        print(f"F.linear {rows} x {k} -> {n} ({dtype}): {seconds * 1e3:.3f} ms, "
              f"{2 * rows * k * n / seconds / 1e9:.0f} GFLOP/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=16)
    args = ap.parse_args()
    ns = argparse.Namespace(model="smollm2-135m", threads=args.threads, concurrency=16,
                            max_num_batched_tokens=None, input_len=256, output_len=128,
                            num_requests=args.prompts, fp32_kv_cache_dtype="auto")
    engine = offline_engine(args.dtype, ns)
    prompts = workload_prompts(engine, ns, seed=7)
    warm_up(engine, prompts)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt, params, f"prefill-{i}")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        engine.step()
        engine.step()
        wall = time.perf_counter() - start
    print(f"two prefill steps, {args.prompts} prompts of ~{len(prompts[0])} tokens, "
          f"{args.dtype}, {args.threads} threads: {wall * 1e3:.0f} ms by wall clock (the "
          "C++ kernels' calls are not profiler events: wall minus the table's total)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    while engine.has_unfinished():
        engine.step()
    gemm_rates(getattr(torch, args.dtype), args.threads)


if __name__ == "__main__":
    main()
