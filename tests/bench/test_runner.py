"""Arrival processes and the load generator, against an in-process fake target."""

from __future__ import annotations

import asyncio
import itertools
import math
import statistics

import pytest

from splitserve.bench.arrivals import arrival_offsets
from splitserve.bench.metrics import RequestRecord
from splitserve.bench.runner import RunConfig, RunResult, run
from splitserve.bench.workloads import BenchRequest, WorkloadConfig, make_workload


def gaps(rate: float, burstiness: float, n: int, seed: int = 0) -> list[float]:
    offsets = list(itertools.islice(arrival_offsets(rate, burstiness, seed), n + 1))
    return [b - a for a, b in itertools.pairwise(offsets)]


def test_poisson_mean_rate_and_exponential_gaps() -> None:
    g = gaps(rate=5.0, burstiness=1.0, n=20000)
    assert next(arrival_offsets(5.0)) == 0.0
    assert all(x >= 0 for x in g)
    assert len(g) / sum(g) == pytest.approx(5.0, rel=0.03)
    # Exponential gaps: coefficient of variation 1.
    assert statistics.pstdev(g) / statistics.mean(g) == pytest.approx(1.0, rel=0.05)
    assert gaps(5.0, 1.0, 50, seed=3) == gaps(5.0, 1.0, 50, seed=3)
    assert gaps(5.0, 1.0, 50, seed=3) != gaps(5.0, 1.0, 50, seed=4)


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_burstiness_changes_variance_not_rate(burstiness: float) -> None:
    g = gaps(rate=2.0, burstiness=burstiness, n=20000, seed=1)
    assert len(g) / sum(g) == pytest.approx(2.0, rel=0.05)
    # Gamma(shape B, mean 1/R): squared CV = 1/B.
    cv2 = statistics.pvariance(g) / statistics.mean(g) ** 2
    assert cv2 == pytest.approx(1.0 / burstiness, rel=0.12)


def test_infinite_rate_all_at_once_and_bad_values() -> None:
    assert list(itertools.islice(arrival_offsets(math.inf), 5)) == [0.0] * 5
    for rate, b in ((0.0, 1.0), (-1.0, 1.0), (1.0, 0.0)):
        with pytest.raises(ValueError):
            next(arrival_offsets(rate, b))


class FakeTarget:
    """Streams `max_tokens` one-token chunks, `token_s` apart; counts requests in flight."""

    label = "fake"

    def __init__(self, token_s: float = 0.002, hang: bool = False, fail_every: int = 0
                 ) -> None:
        self.token_s, self.hang, self.fail_every = token_s, hang, fail_every
        self.in_flight = self.peak = self.calls = 0

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def send(self, request: BenchRequest, record: RequestRecord, clock) -> None:
        self.calls += 1
        if self.fail_every and self.calls % self.fail_every == 0:
            raise ConnectionResetError("peer went away")
        record.mark_sent(clock())
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            if self.hang:
                await asyncio.sleep(3600)
            for _ in range(request.max_tokens):
                await asyncio.sleep(self.token_s)
                record.add_chunk(clock(), 1)
            record.finish(clock(), "length")
        finally:
            self.in_flight -= 1


def drive(target: FakeTarget, cfg: RunConfig, **workload: object) -> RunResult:
    wl = make_workload(WorkloadConfig(**{"kind": "fixed", "input_len": 8, "output_len": 5,
                                         **workload}))  # type: ignore[arg-type]
    return asyncio.run(run(target, wl, cfg, progress=False))


def test_closed_loop_never_exceeds_concurrency() -> None:
    target = FakeTarget()
    result = drive(target, RunConfig(concurrency=3, num_requests=20),
                   kind="synthetic", max_output_len=12)
    assert len(result.records) == 20 and all(r.ok for r in result.records)
    assert target.peak == 3 and result.peak_in_flight == 3
    assert result.stopped_by == "num_requests"
    # Closed loop: request i+3 is released only when an earlier one has ended.
    ends = sorted(r.end_s for r in result.records)
    for i, r in enumerate(sorted(result.records, key=lambda r: r.scheduled_s)[3:]):
        assert r.scheduled_s >= ends[i] - 1e-9


def test_open_loop_with_concurrency_cap_queues_on_the_client() -> None:
    target = FakeTarget(token_s=0.005)
    result = drive(target, RunConfig(request_rate=2000.0, concurrency=2, num_requests=10))
    assert target.peak == 2 and all(r.ok for r in result.records)
    assert max(r.send_s - r.scheduled_s for r in result.records) > 0.02


def test_duration_stops_dispatch_and_cancels_after_grace() -> None:
    target = FakeTarget(token_s=0.5)  # each request takes 2.5 s, longer than the run
    result = drive(target, RunConfig(request_rate=50.0, duration_s=0.3, grace_s=0.2))
    assert result.stopped_by == "duration"
    assert 0.5 <= result.wall_s < 3.0  # stopped by itself, well before the requests end
    assert result.records and all(r.scheduled_s < 0.3 for r in result.records)
    assert all(r.status == "cancelled" for r in result.records)
    assert all(r.end_s is not None and r.end_s >= 0.5 for r in result.records)
    assert target.in_flight == 0  # every send was really cancelled


def test_max_time_bounds_a_hung_server() -> None:
    result = drive(FakeTarget(hang=True), RunConfig(num_requests=4, max_time_s=0.3))
    assert [r.status for r in result.records] == ["cancelled"] * 4
    assert result.wall_s < 2.0


def test_request_timeout_and_exceptions_are_recorded() -> None:
    result = drive(FakeTarget(hang=True), RunConfig(num_requests=2, request_timeout_s=0.05))
    assert [r.status for r in result.records] == ["error", "error"]
    assert result.records[0].error.startswith("timeout after 0.05")
    result = drive(FakeTarget(fail_every=2), RunConfig(num_requests=4, concurrency=1))
    assert [r.status for r in result.records] == ["ok", "error", "ok", "error"]
    assert result.records[1].error == "ConnectionResetError: peer went away"


def test_multi_turn_waits_for_previous_turn() -> None:
    result = drive(FakeTarget(), RunConfig(request_rate=math.inf, num_requests=24),
                   kind="multi-turn", num_turns=3, input_len=4, output_len=3)
    records = result.records
    assert all(r.ok for r in records)
    for r in records[8:]:
        previous = records[r.index - 8]
        assert r.send_s >= previous.end_s


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="num-requests"):
        RunConfig()
    with pytest.raises(ValueError, match="infinite rate"):
        RunConfig(duration_s=1.0)  # would send without bound
    with pytest.raises(ValueError):
        RunConfig(num_requests=1, concurrency=0)
