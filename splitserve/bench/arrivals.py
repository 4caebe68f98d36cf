"""Open-loop arrival processes: when each request is due, in seconds from the run's start.

Gaps between arrivals are gamma-distributed with shape B (--burstiness) and mean 1/R
(--request-rate): B = 1 is a Poisson process; B < 1 is burstier (gap variance 1/(B R^2)
grows as B shrinks), B > 1 is more regular. R = inf sends everything at t = 0. The closed
loop (--concurrency without a rate) is the runner's job: it has no schedule.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator


def arrival_offsets(rate: float, burstiness: float = 1.0, seed: int = 0) -> Iterator[float]:
    """Endless, non-decreasing arrival times; the first request is due at 0.

    Seeded apart from the workload (seed "arrivals-<seed>"), so a sweep over rates sends the
    same prompts at every rate.
    """
    if not rate > 0:
        raise ValueError(f"request rate must be > 0 (inf: all at once), got {rate}")
    if not burstiness > 0 or math.isinf(burstiness):
        raise ValueError(f"burstiness must be a finite number > 0, got {burstiness}")
    rng = random.Random(f"arrivals-{seed}")
    now = 0.0
    while True:
        yield now
        if not math.isinf(rate):
            now += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
