"""The host's speed at a given moment: one measurement both a profile and a sweep take.

A profile's step times hold the speed of the minutes it was taken in; on a VM whose speed
moves 20% between one quarter of an hour and the next (BENCHMARKS.md, sixteenth session),
a sweep measured later runs at another one, and the simulator, which knows only the
profile, misses by that much. So both measure the same probe: the median of batch-1 decode
steps at PROBE_CONTEXT tokens, in an engine of the profile's model, dtype and threads.
`splitserve profile` records its probe's median with the points (Profile.speed_probe_ms;
its probe runs in a `SpeedProbe` too: the same process, engine and code as a sweep's);
`bench disagg --speed-probe-s S` probes for S seconds between the sweep's runs (a
`SpeedProbe`: an engine in a process of its own, loaded once, idle while the runs go); and
`bench simulate` runs each rate at the speed level its probes saw, relative to the
profile's (sim.speed.HostSpeed's level).

    python -m splitserve.sim.probe --model M --dtype D --threads T
        reads seconds on stdin, one per line; answers each with {"median_ms": ...,
        "samples": n} on stdout, after a first line {"ready": true}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

from splitserve.sim.child import AnsweringChild

if TYPE_CHECKING:
    from splitserve.engine.llm_engine import LLMEngine

PROBE_CONTEXT = 64  # tokens each probe sequence holds
PROBE_STEPS = 4  # decode steps per measurement (bench.offline.decode_step_ms's median)


def probe_engine(model: str, dtype: str, threads: int) -> LLMEngine:
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(model=model, dtype=dtype, num_threads=threads,
                                  enable_prefix_caching=False, num_kv_blocks=64))


def probe_step_ms(engine: LLMEngine) -> float:
    """One probe measurement: a batch-1 decode step at PROBE_CONTEXT tokens (median of
    PROBE_STEPS steps), milliseconds."""
    from splitserve.bench.offline import decode_step_ms

    return decode_step_ms(engine, 1, PROBE_CONTEXT, steps=PROBE_STEPS)


def probe_for(engine: LLMEngine, seconds: float) -> list[float]:
    """Probe measurements taken one after another for `seconds` (at least one)."""
    start, samples = time.monotonic(), [probe_step_ms(engine)]
    while time.monotonic() - start < seconds:
        samples.append(probe_step_ms(engine))
    return samples


class SpeedProbe:
    """A probe engine in a child process: `measure(seconds)` -> median ms. Use as a context
    manager (the child exits with it). A child that does not answer in time (the engine's
    load within `load_timeout_s`, a measurement within its seconds plus `answer_slack_s`)
    is killed and the call raises TimeoutError: a sweep never waits on a hung probe."""

    def __init__(self, model: str, dtype: str, threads: int, load_timeout_s: float = 600.0,
                 answer_slack_s: float = 120.0,
                 command: list[str] | None = None) -> None:
        # `command` replaces the probe's own (tests: a child that never answers)
        self._child = AnsweringChild(
            command or [sys.executable, "-m", "splitserve.sim.probe", "--model", model,
                        "--dtype", dtype, "--threads", str(threads)], "the speed probe")
        self._answer_slack_s = answer_slack_s
        try:
            self._answer(load_timeout_s)  # {"ready": true} once the engine is loaded
        except BaseException:
            self.close()
            raise

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self._child.proc

    def _answer(self, timeout_s: float) -> dict[str, Any]:
        """The child's next JSON line (other lines on its stdout are skipped)."""
        deadline = time.monotonic() + timeout_s
        while line := self._child.read_line(max(0.0, deadline - time.monotonic())):
            if line.startswith(b"{"):
                answer: dict[str, Any] = json.loads(line)
                return answer
        raise RuntimeError(f"the speed probe exited (code {self._child.proc.wait()})")

    def measure(self, seconds: float) -> float:
        """The median probe measurement over `seconds` of probing, milliseconds."""
        self._child.send(f"{seconds}\n".encode())
        return float(self._answer(seconds + self._answer_slack_s)["median_ms"])

    def close(self) -> None:
        self._child.close()

    def __enter__(self) -> SpeedProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m splitserve.sim.probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    engine = probe_engine(args.model, args.dtype, args.threads)
    probe_step_ms(engine)  # warm-up
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        samples = probe_for(engine, float(line))
        print(json.dumps({"median_ms": statistics.median(samples), "samples": len(samples)}),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
