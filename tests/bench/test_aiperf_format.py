"""aiperf's profile_export_aiperf.json read as our summary, and `bench compare` of it.

data/aiperf_profile_export_c4.json is a real, untrimmed export of aiperf 0.13.0 (schema 1.4)
from benchmarks/aiperf_vs_bench.sh: SmolLM2-135M behind router + 1 decode worker on a CPU,
/v1/chat/completions streaming, 16 requests at concurrency 4, 128 prompt tokens (+ the chat
template), 64 output tokens, --use-server-token-count.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from splitserve.bench import aiperf_format, compare, report, vllm_format
from splitserve.bench.metrics import summarize
from tests.bench.test_report import make_records

EXPORT = Path(__file__).parent / "data" / "aiperf_profile_export_c4.json"


@pytest.fixture
def export() -> dict[str, Any]:
    return json.loads(EXPORT.read_text())


def test_a_real_export_maps_onto_our_summary(export: dict[str, Any]) -> None:
    assert aiperf_format.is_aiperf_result(export)
    assert not vllm_format.is_vllm_result(export)
    s = aiperf_format.summary_from_aiperf(export)
    assert (s["num_requests"], s["completed"], s["failed"], s["cancelled"]) == (16, 16, 0, 0)
    assert s["duration_s"] == pytest.approx(22.191497984)  # benchmark_duration, in s
    assert (s["total_prompt_tokens"], s["total_output_tokens"]) == (2528, 1024)
    assert s["prompt_tokens_reported"] is True  # run with --use-server-token-count
    assert s["request_throughput"] == pytest.approx(0.7208943447789707)
    assert s["output_throughput"] == pytest.approx(46.13723806585413)
    assert s["total_token_throughput"] == pytest.approx(160.0385445409315)
    assert s["goodput"] is None and s["slo"] == {}
    # TTFT, TPOT (aiperf's per-request "inter_token_latency"), ITL (its per-chunk
    # "inter_chunk_latency") and E2E (its "request_latency"), in ms.
    assert s["ttft_ms"]["mean"] == pytest.approx(1474.6913859375)
    assert s["ttft_ms"]["p50"] == pytest.approx(1412.166033)
    assert s["tpot_ms"]["p99"] == pytest.approx(81.53363761904761)
    assert s["itl_ms"]["p99"] == pytest.approx(195.94494885999976)
    assert s["e2e_ms"]["p90"] == pytest.approx(6087.734757)
    assert (s["tpot_ms"]["count"], s["itl_ms"]["count"]) == (16, 1000)  # requests; gaps
    assert {"p1", "p50", "p90", "p99", "min", "max"} <= set(s["e2e_ms"])


def test_the_mapped_values_obey_our_definitions(export: dict[str, Any]) -> None:
    """Throughputs are totals over the duration (aiperf divides by its observation window,
    within 0.1% of benchmark_duration); every request has 64 output tokens, so the mean TPOT
    is (mean E2E - mean TTFT) / 63 when aiperf's "ITL" is indeed our TPOT."""
    s = aiperf_format.summary_from_aiperf(export)
    assert s["request_throughput"] == pytest.approx(s["completed"] / s["duration_s"], rel=1e-3)
    assert s["output_throughput"] == pytest.approx(s["total_output_tokens"] / s["duration_s"],
                                                   rel=1e-3)
    assert s["tpot_ms"]["mean"] == pytest.approx(
        (s["e2e_ms"]["mean"] - s["ttft_ms"]["mean"]) / 63)
    assert s["ttft_ms"]["p50"] <= s["ttft_ms"]["p90"] <= s["ttft_ms"]["p99"] <= s["ttft_ms"]["max"]


def test_units_errors_and_slos_are_converted(export: dict[str, Any]) -> None:
    data = copy.deepcopy(export)
    data["time_to_first_token"] = {"unit": "sec", "avg": 0.25, "p50": 0.2, "count": 4}
    data["benchmark_duration"] = {"unit": "ms", "avg": 8000.0}
    data["request_throughput"] = {"unit": "requests/min", "avg": 120.0}
    data["error_request_count"] = {"unit": "requests", "avg": 3.0}
    data["goodput"] = {"unit": "requests/sec", "avg": 0.5}
    data["input_config"]["slos"] = {"time_to_first_token": 500, "inter_token_latency": 50,
                                    "tokens_per_second": 20}
    s = aiperf_format.summary_from_aiperf(data)
    assert s["ttft_ms"] == {"count": 4, "mean": 250.0, "p50": 200.0}
    assert s["duration_s"] == 8.0 and s["request_throughput"] == 2.0
    assert (s["num_requests"], s["completed"], s["failed"]) == (19, 16, 3)
    assert s["goodput"] == 0.5
    assert s["slo"] == {"ttft_ms": 500.0, "tpot_ms": 50.0, "tokens_per_second": 20.0}
    data["request_latency"]["unit"] = "fortnights"
    with pytest.raises(ValueError, match="request_latency.*fortnights"):
        aiperf_format.summary_from_aiperf(data)


def test_compare_reads_the_export_beside_a_bench_serve_run(
        export: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ours = tmp_path / "ours.json"
    records = make_records(1.0)  # no SLO, like the export
    report.save(ours, report.run_json("bench serve", {}, summarize(records), {}, records))
    loaded = report.load(EXPORT)
    assert loaded["label"] == "aiperf smollm2-135m" and loaded["requests"] == []
    assert compare.main([str(ours), str(EXPORT), "--plot-dir", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    lines = {line[:32].strip(): line[32:].split() for line in out.splitlines()[3:]}
    assert out.splitlines()[:2] == ["A = bench serve", "B = aiperf smollm2-135m"]
    assert lines["completed requests"] == ["4", "16", "+12", "4.00x"]
    # Our run's TTFT is 100 ms for every request; aiperf's p50 is 1412.17 ms.
    assert lines["TTFT p50 (ms)"] == ["100.00", "1412.17", "+1312.17", "14.12x"]
    assert lines["TPOT p99 (ms)"][1] == "81.53" and lines["ITL p99 (ms)"][1] == "195.94"
    assert lines["E2E mean (ms)"][1] == "5534.92"
    assert lines["output token throughput (tok/s)"][1] == "46.14"
    assert "SLOs differ" not in out  # neither file has one
    assert "no plots: a file without per-request records" in out
