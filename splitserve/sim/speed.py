"""The host's speed as it drifts: the simulator's one source of chance beyond the trace.

A shared or virtual machine does not run at one speed: on the 2-vCPU VM of BENCHMARKS.md
the same step takes 20-30% more or less from one minute to the next. A deterministic
simulation of a served run is chaotic where it matters most for the tails: a request that
ends 50 ms earlier or later flips a routing tie, and a long prompt then lands on a busy
worker or an idle one (BENCHMARKS.md, sixteenth session). So the simulator can run a trace
several times, each under its own drift, and report every figure's median and spread
across the runs (`bench simulate --replicates N`).

The drift model: time is cut into periods of `period_s`; in each, every step that starts
runs `factor` times its modelled length, a factor drawn independently per period from a
lognormal of mean 1 whose log has standard deviation `sigma`. `splitserve profile`
measures sigma on the machine (`measure_speed`: batch-1 decode steps timed over a while,
the spread of their per-period medians). On top of the drift, a `level`: how much slower
(> 1) or faster the host ran during the simulated run than while the profile was taken,
from the speed probes both took (sim.probe: a batch-1 decode step). The level scales the
decode steps only; a step with prompt tokens keeps the profile's speed (times the drift).
On the two fp32 sweeps of the thirtieth and thirty-first sessions the served TTFTs did not
follow the probes: with the level on every step 27 of 80 figures missed 15%, with it on
decode steps only 24, without it 33; a prefill probe of its own (a 64-token prompt's
prefill, tried in the thirty-first session) moved with the decode probe and made it 20
of 40 on the sweep that had it, against 17 (BENCHMARKS.md).
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable


class HostSpeed:
    """Piecewise-constant slowdown factors, reproducible from (seed, period index)."""

    def __init__(self, sigma: float, period_s: float, seed: int, level: float = 1.0) -> None:
        if not sigma >= 0 or not period_s > 0 or not level > 0:
            raise ValueError(f"HostSpeed needs sigma >= 0, period_s > 0 and level > 0, got "
                             f"{sigma!r}, {period_s!r}, {level!r}")
        self.sigma = sigma
        self.period_s = period_s
        self.seed = seed
        self.level = level
        self._drifts: dict[int, float] = {}

    def factor(self, now_s: float, kind: str = "decode") -> float:
        """The step-length factor of a step of `kind` ("decode", or "prefill": it computes
        prompt tokens) starting at `now_s`: the period's drift, times the level for a
        decode step."""
        level = self.level if kind == "decode" else 1.0
        if self.sigma == 0:
            return level
        period = math.floor(now_s / self.period_s)
        drift = self._drifts.get(period)
        if drift is None:
            # Its own generator per period: the drift never depends on the order of queries.
            rng = random.Random(self.seed * 1_000_003 + period)
            drift = self._drifts[period] = math.exp(rng.gauss(-self.sigma ** 2 / 2, self.sigma))
        return level * drift  # (the drift has mean 1)


def speed_sigma(samples: list[tuple[float, float]], period_s: float) -> float:
    """The standard deviation of log(median step time) across periods of `period_s`, from
    (time, step milliseconds) samples; 0.0 with fewer than two periods sampled."""
    by_period: dict[int, list[float]] = {}
    for at_s, ms in samples:
        by_period.setdefault(math.floor(at_s / period_s), []).append(ms)
    logs = [math.log(statistics.median(v)) for v in by_period.values() if v]
    return statistics.stdev(logs) if len(logs) >= 2 else 0.0


def measure_speed(step_ms: Callable[[], float], duration_s: float,
                  period_s: float) -> tuple[float, float]:
    """Time `step_ms()` (one measurement's milliseconds) again and again for `duration_s`
    (at least once): (speed_sigma of the samples at `period_s`, their median)."""
    start = time.monotonic()
    samples = [(0.0, step_ms())]
    while (now := time.monotonic() - start) < duration_s:
        samples.append((now, step_ms()))
    return speed_sigma(samples, period_s), statistics.median(ms for _, ms in samples)
