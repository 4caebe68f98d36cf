"""A lone stream's TPOT split into the served engine's step and the loop's work between
steps, from the decode worker's own step trace (one process, one time).

    PYTHONPATH=. .venv/bin/python benchmarks/lone_stream_trace.py [--dtype bfloat16]
        [--threads 2] [--requests 8]

A router and one decode worker (prefilling its own prompts) as processes on 127.0.0.1
with SPLITSERVE_STEP_TRACE set for them; `splitserve bench serve` at concurrency 1 (256
words in, 128 tokens out, EOS ignored). Prints the client's TPOT line and the medians of
the worker's decode-only steps: "ms" (the forward pass and sampling) and "gap_ms" (the
engine loop's own work since the previous step: dispatching outputs, commands).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=8)
    args = ap.parse_args()
    trace = tempfile.mkdtemp(prefix="step-trace-")
    os.environ["SPLITSERVE_STEP_TRACE"] = trace  # the deployment's processes inherit it
    from splitserve.bench.procs import local_deployment

    try:
        with local_deployment("smollm2-135m", num_prefill=0, num_decode=1,
                              local_prefill_threshold=10**9, threads=args.threads,
                              worker_args=("--no-prefix-caching", "--num-kv-blocks", "512",
                                           "--dtype", args.dtype)) as addrs:
            env = {k: v for k, v in os.environ.items() if k != "SPLITSERVE_STEP_TRACE"}
            out = subprocess.run(
                [sys.executable, "-m", "splitserve.cli", "bench", "serve", "--target",
                 f"grpc://{addrs['router']}", "--workload", "fixed", "--input-len", "256",
                 "--output-len", "128", "--concurrency", "1", "--num-requests",
                 str(args.requests), "--seed", "3"],
                env=env, capture_output=True, text=True, check=True)
            print("\n".join(line for line in out.stdout.splitlines() if "TPOT" in line))
        records = [json.loads(line) for path in glob.glob(f"{trace}/*.jsonl")
                   for line in open(path, encoding="utf-8")]
    finally:
        shutil.rmtree(trace, ignore_errors=True)
    decode = [r for r in records if r["decode"] == 1 and r["prompt_tokens"] == 0]
    gaps = sorted(r["gap_ms"] for r in decode)
    print(f"decode-only steps {len(decode)}: step median "
          f"{statistics.median(r['ms'] for r in decode):.2f} ms, gap median "
          f"{statistics.median(gaps):.3f} ms, gap p90 {gaps[int(len(gaps) * 0.9)]:.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
