"""Metrics math on hand-made timings: TTFT / TPOT / ITL / E2E, percentiles, goodput."""

from __future__ import annotations

import random

import numpy as np
import pytest

from splitserve.bench.metrics import (
    RequestRecord,
    meets_slo,
    parse_slo,
    percentile,
    stats,
    summarize,
    summarize_by_tag,
)


def record(index: int, send: float, chunks: list[tuple[float, int]], end: float,
           prompt: int = 10, output: int | None = None, tag: str = "") -> RequestRecord:
    r = RequestRecord(index=index, tag=tag, scheduled_s=send, prompt_tokens=prompt)
    r.mark_sent(send)
    for t, k in chunks:
        r.add_chunk(t, k)
    r.finish(end, "length", output)
    return r


def test_single_request_definitions() -> None:
    # Sent at 1.0 s; tokens at 1.1 (1), 1.2 (1), 1.5 (3 in one chunk); stream ends at 1.6.
    r = record(0, 1.0, [(1.1, 1), (1.2, 1), (1.5, 3)], 1.6)
    assert r.output_tokens == 5
    assert r.ttft_ms == pytest.approx(100.0)
    assert r.e2e_ms == pytest.approx(600.0)
    assert r.tpot_ms == pytest.approx((600.0 - 100.0) / 4)
    # ITL: 100 ms gap for the second token, then the 300 ms gap spread over 3 tokens.
    assert r.itl_ms() == pytest.approx([100.0, 100.0, 100.0, 100.0])


def test_multi_token_first_chunk_adds_no_itl_and_zero_token_chunks_ignored() -> None:
    r = record(0, 0.0, [(0.2, 4), (0.3, 0), (0.4, 2)], 0.5)
    assert r.chunk_tokens == [4, 2]  # the empty chunk is not a token arrival
    assert r.ttft_ms == pytest.approx(200.0)
    assert r.itl_ms() == pytest.approx([100.0, 100.0])
    assert r.tpot_ms == pytest.approx(300.0 / 5)


def test_reported_usage_overrides_chunk_count() -> None:
    r = record(0, 0.0, [(0.1, 1), (0.2, 1)], 0.3, output=6)
    r.finish(0.3, "length", 6, 42)
    assert r.output_tokens == 6 and r.prompt_tokens == 42 and r.prompt_tokens_reported
    assert r.tpot_ms == pytest.approx(200.0 / 5)


def test_one_token_has_no_tpot_and_no_itl() -> None:
    r = record(0, 0.0, [(0.05, 1)], 0.06)
    assert r.tpot_ms is None and r.itl_ms() == []


def test_percentile_exact_values() -> None:
    values = [40.0, 10.0, 30.0, 20.0]  # sorted: 10 20 30 40
    assert percentile(values, 0) == 10.0
    assert percentile(values, 50) == 25.0
    assert percentile(values, 90) == pytest.approx(37.0)  # rank 2.7: 30 + 0.7 * 10
    assert percentile(values, 99) == pytest.approx(39.7)
    assert percentile(values, 100) == 40.0
    assert percentile([5.0], 99) == 5.0
    rng = random.Random(0)
    sample = [rng.expovariate(1.0) for _ in range(101)]
    for p in (1, 50, 90, 99, 99.9):
        assert percentile(sample, p) == pytest.approx(float(np.percentile(sample, p)))
    s = stats(values)
    assert s == {"count": 4, "mean": 25.0, "p50": 25.0, "p90": pytest.approx(37.0),
                 "p99": pytest.approx(39.7), "min": 10.0, "max": 40.0}
    assert stats([])["p99"] is None and stats([])["count"] == 0


def test_parse_slo() -> None:
    assert parse_slo("ttft_ms=500,tpot_ms=50") == {"ttft_ms": 500.0, "tpot_ms": 50.0}
    assert parse_slo("e2e=2000") == {"e2e_ms": 2000.0}
    assert parse_slo(None) == {} and parse_slo("") == {}
    for bad in ("ttft_ms", "itl_ms=5", "ttft_ms=-1", "foo=1"):
        with pytest.raises(ValueError):
            parse_slo(bad)


def test_summary_goodput_and_throughput() -> None:
    records = [
        # ttft 100, tpot (1000-100)/9 = 100: meets ttft<=200, misses tpot<=50
        record(0, 0.0, [(0.1, 1)] + [(0.1 + 0.1 * i, 1) for i in range(1, 10)], 1.0),
        # ttft 50, tpot (500-50)/9 = 50: meets both (boundary counts)
        record(1, 1.0, [(1.05, 1)] + [(1.05 + 0.05 * i, 1) for i in range(1, 10)], 1.5),
        # ttft 300: misses ttft
        record(2, 2.0, [(2.3, 1), (2.35, 1)], 2.4, prompt=30),
        # one token: no TPOT to miss; ttft 20
        record(3, 3.0, [(3.02, 1)], 4.0),
    ]
    failed = RequestRecord(index=4, scheduled_s=3.0, prompt_tokens=99)
    failed.mark_sent(3.0)
    failed.add_chunk(3.1, 1)
    failed.fail(3.5, "HTTP 503: overloaded")
    records.append(failed)
    slo = {"ttft_ms": 200.0, "tpot_ms": 50.0}
    assert [meets_slo(r, slo) for r in records] == [False, True, False, True, False]
    s = summarize(records, slo)
    assert s["duration_s"] == 4.0  # last end
    assert (s["num_requests"], s["completed"], s["failed"], s["cancelled"]) == (5, 4, 1, 0)
    assert s["good_requests"] == 2 and s["goodput"] == pytest.approx(0.5)
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["total_output_tokens"] == 10 + 10 + 2 + 1
    assert s["output_throughput"] == pytest.approx(23 / 4)
    assert s["total_token_throughput"] == pytest.approx((23 + 10 + 10 + 30 + 10) / 4)
    assert s["ttft_ms"]["count"] == 4
    assert s["ttft_ms"]["mean"] == pytest.approx((100 + 50 + 300 + 20) / 4)
    assert s["tpot_ms"]["count"] == 3  # the one-token request has none
    assert s["tpot_ms"]["p50"] == pytest.approx(100.0)
    assert s["itl_ms"]["count"] == 9 + 9 + 1
    assert s["e2e_ms"]["max"] == pytest.approx(1000.0)
    assert s["failed_e2e_ms"]["count"] == 1  # failures are timed apart from completions
    assert s["failed_e2e_ms"]["max"] == pytest.approx(500.0)
    assert s["errors"] == {"HTTP 503: overloaded": 1}
    # No objectives: every completed request is good.
    assert summarize(records)["good_requests"] == 4
    assert summarize(records, {"ttft_ms": 200.0, "e2e_ms": 600.0})["good_requests"] == 1


def test_summary_by_tag_uses_whole_run_duration() -> None:
    records = [record(0, 0.0, [(0.1, 1), (0.2, 1)], 0.2, tag="short"),
               record(1, 0.0, [(0.5, 1), (0.6, 1)], 2.0, tag="long")]
    by_tag = summarize_by_tag(records)
    assert sorted(by_tag) == ["long", "short"]
    assert by_tag["short"]["duration_s"] == 2.0
    assert by_tag["short"]["request_throughput"] == pytest.approx(0.5)
    assert by_tag["long"]["ttft_ms"]["mean"] == pytest.approx(500.0)
    assert summarize_by_tag(records[:1]) == {}
