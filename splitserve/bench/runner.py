"""The asyncio load generator: dispatch a workload to a target and record every request.

Modes (RunConfig):
- open loop: requests are due at `arrival_offsets(rate, burstiness)`; with --concurrency
  as well, at most C are in flight and the rest wait (client-side queueing, visible as
  send_s - scheduled_s);
- closed loop: --concurrency C with an infinite rate: C requests in flight, each slot sends
  the next request as soon as its previous one ends.

Stopping, always by itself: dispatch ends after --num-requests or at --duration seconds,
whichever comes first. After a --duration stop, requests still in flight get --grace
seconds, then are cancelled (status "cancelled"); --max-time bounds the whole run in every
case, and --request-timeout each request (status "error"). A multi-turn request is sent
only after its previous turn has ended.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from splitserve.bench.arrivals import arrival_offsets
from splitserve.bench.metrics import RequestRecord
from splitserve.bench.targets import Target
from splitserve.bench.workloads import BenchRequest


@dataclass(frozen=True)
class RunConfig:
    """How hard and how long to drive the target."""

    request_rate: float = math.inf  # requests/s; inf: all due at once
    burstiness: float = 1.0  # gamma shape of inter-arrival gaps; 1 = Poisson
    concurrency: int | None = None  # cap on requests in flight
    num_requests: int | None = None
    duration_s: float | None = None
    grace_s: float = 30.0  # after --duration: how long in-flight requests may still run
    max_time_s: float = 3600.0  # hard bound on the whole run
    request_timeout_s: float = 600.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.request_rate > 0:
            raise ValueError(f"request rate must be > 0, got {self.request_rate}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be > 0, got {self.burstiness}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("give --num-requests, --duration or both")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        for name in ("duration_s", "max_time_s", "request_timeout_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if not self.grace_s >= 0:
            raise ValueError(f"grace_s must be >= 0, got {self.grace_s}")
        if (math.isinf(self.request_rate) and self.concurrency is None
                and self.num_requests is None):
            raise ValueError("an infinite rate with no --concurrency needs --num-requests")

    @property
    def closed_loop(self) -> bool:
        return self.concurrency is not None and math.isinf(self.request_rate)


@dataclass
class RunResult:
    records: list[RequestRecord]
    wall_s: float  # the run's own wall time, grace and cancellation included
    start_unix_s: float  # time.time() at the start, to line results up with server logs
    stopped_by: str  # "num_requests" | "duration" | "max_time" | "workload"
    peak_in_flight: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class _Run:
    """State of one run; see run()."""

    def __init__(self, target: Target, cfg: RunConfig, progress: bool) -> None:
        self.target, self.cfg = target, cfg
        self.t0 = time.perf_counter()
        self.records: list[RequestRecord] = []
        self.finished: list[asyncio.Event] = []  # per request index
        self.tasks: list[asyncio.Task[None]] = []
        self.slots = asyncio.Semaphore(cfg.concurrency) if cfg.concurrency else None
        self.in_flight = 0
        self.peak_in_flight = 0
        self.bar = _progress_bar(cfg.num_requests, progress)

    def clock(self) -> float:
        return time.perf_counter() - self.t0

    async def one(self, request: BenchRequest, record: RequestRecord) -> None:
        try:
            if request.depends_on is not None and request.depends_on < len(self.finished):
                await self.finished[request.depends_on].wait()
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            try:
                await asyncio.wait_for(self.target.send(request, record, self.clock),
                                       self.cfg.request_timeout_s)
            finally:
                self.in_flight -= 1
            if record.status == "pending":
                record.fail(self.clock(), "target returned without finishing the record")
        except asyncio.CancelledError:
            record.fail(self.clock(), "cancelled at the end of the run", status="cancelled")
            raise
        except asyncio.TimeoutError:
            record.fail(self.clock(), f"timeout after {self.cfg.request_timeout_s:g} s")
        except Exception as err:  # noqa: BLE001 - any failure is a result, not a crash
            record.fail(self.clock(), f"{type(err).__name__}: {err}")
        finally:
            if self.slots is not None:
                self.slots.release()
            self.finished[record.index].set()
            self.bar.update(1)

    async def dispatch(self, workload: Iterable[BenchRequest]) -> str:
        """Start requests until a bound is hit; returns which bound stopped dispatch."""
        cfg = self.cfg
        stop_at = min(cfg.duration_s or math.inf, cfg.max_time_s)
        stopped_by = "duration" if stop_at == cfg.duration_s else "max_time"
        offsets = arrival_offsets(cfg.request_rate, cfg.burstiness, cfg.seed)
        for index, (request, due) in enumerate(zip(workload, offsets, strict=False)):
            if cfg.num_requests is not None and index >= cfg.num_requests:
                return "num_requests"
            if due >= stop_at:
                return stopped_by
            await asyncio.sleep(max(0.0, due - self.clock()))
            if self.slots is not None:
                try:
                    await asyncio.wait_for(self.slots.acquire(), _finite(stop_at - self.clock()))
                except asyncio.TimeoutError:
                    return stopped_by
            if self.clock() >= stop_at:
                if self.slots is not None:
                    self.slots.release()
                return stopped_by
            record = RequestRecord(index=index, tag=request.tag, prompt_tokens=request.prompt_len,
                                   scheduled_s=self.clock() if cfg.closed_loop else due)
            self.records.append(record)
            self.finished.append(asyncio.Event())
            self.tasks.append(asyncio.create_task(self.one(request, record)))
            if index % 64 == 63:
                await asyncio.sleep(0)  # let sends start during an all-at-once burst
        return "workload"

    async def drain(self, stopped_by: str) -> None:
        """Wait for in-flight requests until the run's end, then cancel the rest."""
        cfg = self.cfg
        end_at = cfg.max_time_s
        if stopped_by == "duration" and cfg.duration_s is not None:
            end_at = min(end_at, cfg.duration_s + cfg.grace_s)
        pending = [t for t in self.tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=max(0.0, end_at - self.clock()))
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def run(target: Target, workload: Iterable[BenchRequest], cfg: RunConfig,
              progress: bool = True) -> RunResult:
    """Drive an opened `target` with `workload` under `cfg`; never raises for a request."""
    state = _Run(target, cfg, progress)
    start_unix = time.time()
    try:
        dispatch = asyncio.ensure_future(state.dispatch(workload))
        try:
            stopped_by = await asyncio.wait_for(dispatch, cfg.max_time_s)
        except asyncio.TimeoutError:
            stopped_by = "max_time"
        await state.drain(stopped_by)
    finally:
        state.bar.close()
    return RunResult(state.records, state.clock(), start_unix, stopped_by,
                     state.peak_in_flight)


def _finite(seconds: float) -> float | None:
    return None if math.isinf(seconds) else seconds


def _progress_bar(total: int | None, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="req", desc="requests", file=sys.stderr,
                disable=not enabled, dynamic_ncols=True, leave=False)
