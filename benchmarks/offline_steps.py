"""Benchmark: where the engine's time goes on `bench peer`'s workload, step by step.

    PYTHONPATH=. python benchmarks/offline_steps.py [--dtype float32] [--num-requests 64]

The engine alone (as `bench peer` runs it offline: every prompt submitted at once,
`max_num_seqs` = the concurrency) on the `fixed` workload's prompts, each forward pass
timed. Prints the throughput, then the pure decode steps by batch size (count, median) and
the steps that carried prompt tokens (their count, time and tokens), so a change to the
decode step or to prefill shows where it lands.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from typing import Any

from splitserve.bench.offline import run_engine
from splitserve.bench.peer import offline_engine, warm_up, workload_prompts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--fp32-kv-cache-dtype", default="auto",
                   choices=["auto", "bfloat16", "float16"], help="as bench peer's")
    ns = p.parse_args()
    engine = offline_engine(ns.dtype, ns)
    prompts = workload_prompts(engine, ns, seed=0)
    warm_up(engine, prompts)

    steps: list[tuple[float, int, int]] = []  # seconds, prompt tokens, decode rows
    execute = engine.runner.execute

    def timed(scheduled: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = execute(scheduled, *args, **kwargs)
        prompt = sum(item.num_tokens for item in scheduled if item.seq.is_prefilling)
        steps.append((time.perf_counter() - start, prompt,
                      sum(1 for item in scheduled if not item.seq.is_prefilling)))
        return result

    engine.runner.execute = timed  # type: ignore[method-assign]
    result = run_engine(engine, prompts, ns.output_len)
    print(f"{ns.dtype}: {result.output_tokens / result.seconds:.1f} output tok/s, "
          f"{result.seconds:.2f} s, {len(steps)} steps")
    decode_by_batch: dict[int, list[float]] = defaultdict(list)
    for seconds, prompt, rows in steps:
        if not prompt:
            decode_by_batch[rows].append(seconds)
    for rows in sorted(decode_by_batch):
        times = decode_by_batch[rows]
        print(f"  decode steps of {rows:3d} rows: {len(times):4d}, median "
              f"{statistics.median(times) * 1e3:.1f} ms, {sum(times):.2f} s in all")
    mixed = [(seconds, prompt) for seconds, prompt, _ in steps if prompt]
    print(f"  steps with prompt tokens: {len(mixed)}, {sum(s for s, _ in mixed):.2f} s, "
          f"{sum(n for _, n in mixed)} prompt tokens")


if __name__ == "__main__":
    main()
