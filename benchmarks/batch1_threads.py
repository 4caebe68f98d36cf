"""The offline engine's batch-1 decode step with a given number of CPU threads: would a lone
stream gain from leaving a core to the serving path's processes?

    PYTHONPATH=. .venv/bin/python benchmarks/batch1_threads.py [--threads 1,2] [--rounds 3]
        [--dtype bfloat16] [--model smollm2-135m]

Per thread count (in a process of its own, alternating): one 256-token prompt, greedy;
the step is (time of 129 output tokens - time of 2) / 127, `--rounds` times. Prints every
value and the median per thread count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def measure(model: str, dtype: str, threads: int, rounds: int) -> list[float]:
    from splitserve.common.sampling_params import SamplingParams
    from splitserve.llm import LLM

    llm = LLM(model=model, dtype=dtype, num_threads=threads)
    prompt = list(range(100, 356))
    long = SamplingParams(max_tokens=129, ignore_eos=True, temperature=0.0)
    short = SamplingParams(max_tokens=2, ignore_eos=True, temperature=0.0)
    llm.generate([prompt], long)  # warm-up
    steps = []
    for _ in range(rounds):
        start = time.perf_counter()
        llm.generate([prompt], short)
        t_short = time.perf_counter() - start
        start = time.perf_counter()
        llm.generate([prompt], long)
        steps.append((time.perf_counter() - start - t_short) / 127 * 1e3)
    return steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=2, help="processes per thread count")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.model, args.dtype, args.child, args.rounds)))
        return 0
    counts = [int(t) for t in args.threads.split(",")]
    results: dict[int, list[float]] = {t: [] for t in counts}
    for _ in range(args.repeat):
        for t in counts:
            out = subprocess.run([sys.executable, __file__, "--child", str(t), "--rounds",
                                  str(args.rounds), "--dtype", args.dtype, "--model", args.model],
                                 check=True, capture_output=True, text=True).stdout
            steps = json.loads(out.strip().splitlines()[-1])
            results[t] += steps
            print(f"threads {t}: " + ", ".join(f"{s:.2f}" for s in steps) + " ms", flush=True)
    for t, steps in results.items():
        print(f"threads {t}: median {statistics.median(steps):.2f} ms per decode step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
