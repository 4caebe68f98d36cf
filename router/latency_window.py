"""Recent latency samples (TTFT, TPOT) for decisions that need percentiles of the last few
seconds, not the Prometheus histograms' totals since start (router.pd_control reads them).

Samples are (monotonic time, seconds), appended in time order (by the router's loop
thread; any thread may add or read); those older than `horizon_s` or beyond `max_samples`
are dropped as new ones arrive.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque


class LatencyWindow:
    def __init__(self, horizon_s: float = 120.0, max_samples: int = 20_000) -> None:
        if not horizon_s > 0 or max_samples < 1:
            raise ValueError("horizon_s must be > 0 and max_samples >= 1")
        self.horizon_s = horizon_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self._lock = threading.Lock()

    def add(self, value_s: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._samples.append((now, value_s))
            while self._samples[0][0] < now - self.horizon_s:
                self._samples.popleft()

    def values(self, window_s: float, now: float | None = None) -> list[float]:
        """The samples of the last `window_s` seconds, oldest first."""
        since = (time.monotonic() if now is None else now) - window_s
        with self._lock:
            return [v for t, v in self._samples if t >= since]

    def percentile(self, p: float, window_s: float, now: float | None = None
                   ) -> tuple[float | None, int]:
        """(the p-th percentile (0..100, nearest rank) of the last `window_s` seconds'
        samples, or None without any; how many samples there were)."""
        values = sorted(self.values(window_s, now))
        if not values:
            return None, 0
        rank = max(1, math.ceil(p / 100.0 * len(values)))
        return values[rank - 1], len(values)
