"""The host's speed drift (sim.speed), the simulation under it, and `bench simulate`'s
replicates: reproducible per seed, mean one, medians and bands over the runs."""

from __future__ import annotations

import math
import statistics
from types import SimpleNamespace

import pytest

from splitserve.bench.metrics import parse_slo
from splitserve.sim import speed as speed_module
from splitserve.sim import sweep
from splitserve.sim.cluster import Deployment, SimRequest, simulate
from splitserve.sim.speed import HostSpeed, measure_speed, speed_sigma
from tests.sim.test_sim_cluster import flat_model


def test_a_drift_is_piecewise_constant_reproducible_and_of_mean_one() -> None:
    speed = HostSpeed(0.2, 2.0, seed=7)
    assert speed.factor(0.1) == speed.factor(1.9) != speed.factor(2.0)
    again = HostSpeed(0.2, 2.0, seed=7)
    later_first = [again.factor(t) for t in (9.0, 3.0, 0.5)]  # queried in another order
    assert later_first == [speed.factor(t) for t in (9.0, 3.0, 0.5)]
    assert HostSpeed(0.2, 2.0, seed=8).factor(0.1) != speed.factor(0.1)
    factors = [speed.factor(2.0 * k) for k in range(4000)]
    assert statistics.fmean(factors) == pytest.approx(1.0, abs=0.02)
    assert statistics.stdev(math.log(f) for f in factors) == pytest.approx(0.2, abs=0.01)
    assert HostSpeed(0.0, 1.0, seed=3).factor(123.0) == 1.0
    with pytest.raises(ValueError, match="sigma"):
        HostSpeed(-0.1, 1.0, seed=0)
    with pytest.raises(ValueError, match="period_s"):
        HostSpeed(0.1, 0.0, seed=0)


def test_sigma_is_the_spread_of_the_periods_medians(monkeypatch: pytest.MonkeyPatch) -> None:
    # Periods of 1 s with medians 10, 20, 40: logs spaced by log 2.
    samples = [(0.1, 10.0), (0.5, 11.0), (0.9, 9.0), (1.2, 20.0), (2.5, 40.0), (2.6, 40.0)]
    assert speed_sigma(samples, 1.0) == pytest.approx(math.log(2))
    assert speed_sigma([(0.1, 10.0), (0.2, 30.0)], 1.0) == 0.0  # one period: no spread
    assert measure_speed(lambda: 5.0, duration_s=0.05, period_s=0.01) == (0.0, 5.0)
    # A host that runs at one speed for 10 ms, then at a quarter of it, and so on, on a
    # clock that moves 1 ms per reading (a wall clock would let preemption pick the periods).
    clock = [0.0]

    def monotonic() -> float:
        clock[0] += 0.001
        return clock[0]

    def step_ms() -> float:
        return 10.0 if round(clock[0] * 1000) // 10 % 2 == 0 else 40.0

    monkeypatch.setattr(speed_module, "time", SimpleNamespace(monotonic=monotonic))
    drifting, median = measure_speed(step_ms, duration_s=0.06, period_s=0.01)
    assert drifting > 0.5 * math.log(4)
    assert 10.0 <= median <= 40.0
    # However short the probe, one measurement is taken.
    assert measure_speed(lambda: 7.0, duration_s=0.0, period_s=1.0) == (0.0, 7.0)


def test_the_simulation_under_a_drift() -> None:
    model = flat_model()
    trace = [SimRequest(i, 0.3 * i, 64, 20) for i in range(12)]
    plain = simulate(Deployment(num_decode=1), model, trace)
    flat = simulate(Deployment(num_decode=1), model, trace, HostSpeed(0.0, 1.0, seed=1))
    assert [r.chunk_s for r in flat] == [r.chunk_s for r in plain]
    drifted = simulate(Deployment(num_decode=1), model, trace, HostSpeed(0.3, 0.5, seed=1))
    again = simulate(Deployment(num_decode=1), model, trace, HostSpeed(0.3, 0.5, seed=1))
    assert [r.chunk_s for r in drifted] == [r.chunk_s for r in again]
    assert [r.chunk_s for r in drifted] != [r.chunk_s for r in plain]
    # A lone request's steps all start in period 0 (the first 0.5 s): scaled by its factor.
    factor = HostSpeed(0.3, 10.0, seed=4).factor(0.0)
    [lone] = simulate(Deployment(num_decode=1), model, [SimRequest(0, 0.0, 64, 4)],
                      HostSpeed(0.3, 10.0, seed=4))
    assert lone.tpot_ms == pytest.approx(10.0 * factor)


def test_the_level_scales_the_decode_steps_with_or_without_a_drift() -> None:
    assert HostSpeed(0.0, 1.0, seed=3, level=1.25).factor(50.0) == 1.25
    assert HostSpeed(0.0, 1.0, seed=3, level=1.25).factor(50.0, "prefill") == 1.0
    drift = HostSpeed(0.3, 2.0, seed=5)
    slower = HostSpeed(0.3, 2.0, seed=5, level=1.25)
    for t in (0.0, 1.9, 2.0, 7.5, 100.0):
        assert slower.factor(t) == pytest.approx(1.25 * drift.factor(t))
        assert slower.factor(t, "prefill") == drift.factor(t, "prefill") == drift.factor(t)
    model = flat_model()  # prompt steps of 40 ms, decode steps of 10 ms
    [lone] = simulate(Deployment(num_decode=1), model, [SimRequest(0, 0.0, 64, 4)],
                      HostSpeed(0.0, 1.0, seed=0, level=0.8))
    assert lone.tpot_ms == pytest.approx(8.0)
    assert lone.ttft_ms == pytest.approx(40.0)  # the prompt's step at the profile's speed
    for level in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="level"):
            HostSpeed(0.1, 1.0, seed=0, level=level)


def test_replicates_report_the_median_and_band_of_the_runs() -> None:
    model = flat_model()
    workload = sweep.parse_workload(sweep.DEFAULT_WORKLOAD_ARGS, seed=0)
    trace = sweep.make_trace(workload, 4.0, 20)
    slo = parse_slo("tpot_ms=90,ttft_ms=5000")
    deployment = sweep.deployment_of("colocated")
    runs = sweep.replicate_summaries(deployment, model, trace, slo, 9, 0.3, 0.5)
    assert len(runs) == 9
    [one] = sweep.replicate_summaries(deployment, model, trace, slo, 1, 0.3, 0.5)
    assert one == sweep.simulate_summary(deployment, model, trace, slo)  # deterministic
    with pytest.raises(ValueError, match="speed drift"):
        sweep.replicate_summaries(deployment, model, trace, slo, 3, 0.0, 0.5)
    rows = sweep.comparison_rows({4.0: runs}, {4.0: one})
    tpot = next(r for r in rows if r["figure"] == "tpot_ms p99")
    values = sorted(run["tpot_ms"]["p99"] for run in runs)
    assert tpot["predicted"] == values[4] and tpot["runs"] == 9  # the median of 9
    low, high = tpot["band"]
    assert values[0] <= low <= values[1] and values[-2] <= high <= values[-1]
    assert low < high  # the drift moved the tail
    assert tpot["error"] == pytest.approx((values[4] - one["tpot_ms"]["p99"])
                                          / one["tpot_ms"]["p99"])
