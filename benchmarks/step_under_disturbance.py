"""How much a batch-1 decode step slows when another process takes a little CPU now and
then: what the serving path (router, client, the worker's relay) does to a lone stream on
the cores the engine uses.

    PYTHONPATH=. .venv/bin/python benchmarks/step_under_disturbance.py [--dtype bfloat16]
        [--threads 2] [--busy-ms 1.5] [--period-ms 13] [--rounds 5]

The engine's batch-1 decode step (median of 24 steps at a 320-token context), alone and
while a second process sleeps, then spins --busy-ms, every --period-ms (a streamed token's
CPU, about once per step); --rounds of each, interleaved, medians printed. The extra step
time over the CPU the disturbance takes says how much an OpenMP step loses to each
preemption: a thread the OS takes away holds every other at the next barrier.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from engine_args import engine_parser

_SPIN = r"""
import sys, time
busy_s, period_s = float(sys.argv[1]), float(sys.argv[2])
while True:
    time.sleep(period_s - busy_s)
    end = time.perf_counter() + busy_s
    while time.perf_counter() < end:
        pass
"""


def main() -> int:
    ap = engine_parser(__doc__)
    ap.add_argument("--busy-ms", type=float, default=1.5)
    ap.add_argument("--period-ms", type=float, default=13.0)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if not 0 < args.busy_ms < args.period_ms:
        ap.error("need 0 < --busy-ms < --period-ms")

    from splitserve.bench.offline import decode_step_ms
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype,
                                    num_threads=args.threads, num_kv_blocks=512,
                                    max_num_seqs=4))
    decode_step_ms(engine, 1, 320, steps=8)  # warm-up
    alone: list[float] = []
    disturbed: list[float] = []
    for _ in range(args.rounds):
        alone.append(decode_step_ms(engine, 1, 320, steps=24))
        spin = subprocess.Popen([sys.executable, "-c", _SPIN, str(args.busy_ms / 1e3),
                                 str(args.period_ms / 1e3)])
        try:
            time.sleep(0.3)
            disturbed.append(decode_step_ms(engine, 1, 320, steps=24))
        finally:
            spin.kill()
            spin.wait()
    a, d = statistics.median(alone), statistics.median(disturbed)
    print(f"batch-1 decode step ({args.dtype}, {args.threads} threads): alone {a:.2f} ms "
          f"({', '.join(f'{x:.2f}' for x in alone)}), with {args.busy_ms:g} ms of CPU taken "
          f"every {args.period_ms:g} ms {d:.2f} ms ({', '.join(f'{x:.2f}' for x in disturbed)})")
    taken = args.busy_ms * d / args.period_ms  # CPU the disturbance took during one step
    print(f"the step grew {d - a:.2f} ms for about {taken:.2f} ms of CPU taken during it "
          f"({(d - a) / taken:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
