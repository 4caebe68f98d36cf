"""`splitserve bench pd-control`'s pure parts: the shifting workload, goodput per half, the
comparison with static splits; and the CLI flags that turn the controller on."""

from __future__ import annotations

import argparse

import pytest

from splitserve.bench import BENCHMARKS
from splitserve.bench.metrics import RequestRecord
from splitserve.bench.pd_control import comparison, half_alone, schedule, summarize
from splitserve.cli import _pd_control, build_parser


def _args(**changes: object) -> argparse.Namespace:
    base = {"seed": 3, "phase_s": 20.0, "rate_a": 4.0, "rate_b": 1.0, "short_input": 16,
            "long_output": 128, "long_input": 512, "short_output": 8}
    return argparse.Namespace(**{**base, **changes})


def test_the_mix_shifts_halfway() -> None:
    plan = schedule(_args())
    assert plan == schedule(_args())  # seeded: every configuration gets the same requests
    times = [t for t, _ in plan]
    assert times == sorted(times) and 0 < times[0] and times[-1] < 40.0
    first = [r for t, r in plan if t < 20.0]
    second = [r for t, r in plan if t >= 20.0]
    assert {(r.tag, r.prompt_len, r.max_tokens) for r in first} == {("A", 16, 128)}
    assert {(r.tag, r.prompt_len, r.max_tokens) for r in second} == {("B", 512, 8)}
    assert 50 <= len(first) <= 110 and 10 <= len(second) <= 32  # Poisson at 4/s and 1/s
    assert all(len(r.as_prompt().split()) == r.prompt_len for _, r in plan)


def _record(tag: str, ttft_s: float, gap_s: float, ok: bool = True) -> RequestRecord:
    record = RequestRecord(index=0, tag=tag, scheduled_s=0.0)
    record.mark_sent(0.0)
    record.add_chunk(ttft_s, 1)
    record.add_chunk(ttft_s + 4 * gap_s, 4)
    if ok:
        record.finish(ttft_s + 4 * gap_s, "length")
    else:
        record.fail(ttft_s, "boom")
    return record


def test_goodput_per_half_over_its_arrival_span() -> None:
    slo = {"ttft_ms": 1000.0, "tpot_ms": 100.0}
    records = [_record("A", 0.5, 0.05), _record("A", 0.5, 0.2), _record("A", 2.0, 0.05),
               _record("B", 0.5, 0.05), _record("B", 0.5, 0.05, ok=False)]
    summary = summarize(records, slo, phase_s=10.0)
    assert summary["A"]["good"] == 1 and summary["A"]["goodput"] == pytest.approx(0.1)
    assert summary["B"] == {**summary["B"], "requests": 2, "completed": 1, "good": 1}
    assert summary["all"]["good"] == 2 and summary["all"]["goodput"] == pytest.approx(0.1)
    assert summary["A"]["ttft_p90_ms"] == pytest.approx(1700.0)


def test_comparison_against_the_best_and_the_worse_static_split() -> None:
    def result(a: float, b: float) -> dict[str, object]:
        return {"summary": {"A": {"goodput": a}, "B": {"goodput": b},
                            "all": {"goodput": (a + b) / 2}}}

    lines = list(comparison({"control": result(3.0, 1.0), "1:2": result(3.2, 0.4),
                             "2:1": result(0.8, 1.2)}))
    assert lines[0].split() == ["A", "control", "3.000", "req/s;", "best", "static", "1:2",
                                "3.200", "(x0.94),", "worse", "static", "2:1", "0.800",
                                "(x3.75)"]
    assert "best static 2:1 1.200 (x0.83), worse static 1:2 0.400 (x2.50)" in lines[1]
    assert "best static 1:2 1.800 (x1.11), worse static 2:1 1.000 (x2.00)" in lines[2]
    assert list(comparison({"1:2": result(1, 1), "2:1": result(1, 1)})) == []
    alone = list(comparison({"control": result(3.0, 1.0), "1:2/A": result(3.0, 0),
                             "2:1/A": result(1.5, 0), "1:2/B": result(0, 0.5),
                             "2:1/B": result(0, 1.25)}))
    assert len(alone) == 2  # A and B (the whole-run comparison needs whole runs)
    assert "best static alone 1:2/A 3.000 (x1.00), worse static alone 2:1/A 1.500" in alone[0]
    assert "best static alone 2:1/B 1.250 (x0.80), worse static alone 1:2/B 0.500" in alone[1]
    assert "pd-control" in BENCHMARKS


def test_a_half_alone_starts_at_zero() -> None:
    plan = schedule(_args())
    b_alone = half_alone(plan, "B", 20.0)
    assert [r for _, r in b_alone] == [r for _, r in plan if r.tag == "B"]
    assert 0 <= b_alone[0][0] and b_alone[-1][0] < 20.0
    assert half_alone(plan, "A", 20.0) == [(t, r) for t, r in plan if r.tag == "A"]


def test_router_and_worker_flags() -> None:
    parser = build_parser()
    args = parser.parse_args(["router", "--pd-control", "--pd-slo", "ttft_ms=900,tpot_ms=70",
                              "--pd-cooldown", "5", "--pd-consecutive", "4"])
    config = _pd_control(args)["pd_control"]
    assert (config.ttft_slo_ms, config.tpot_slo_ms) == (900.0, 70.0)
    assert (config.cooldown_s, config.consecutive, config.min_decode) == (5.0, 4, 1)
    assert _pd_control(parser.parse_args(["router"])) == {}
    assert parser.parse_args(["decode", "--cluster", "grpc://x:1", "--flippable"]).flippable
