"""Results JSON round trip, the summary table and `bench compare`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from splitserve.bench import compare, report
from splitserve.bench.metrics import RequestRecord, summarize


def make_records(scale: float) -> list[RequestRecord]:
    records = []
    for i in range(4):
        r = RequestRecord(index=i, tag="short" if i % 2 else "long", scheduled_s=i * 0.5,
                          prompt_tokens=20)
        r.mark_sent(i * 0.5)
        for k in range(5):
            r.add_chunk(i * 0.5 + scale * (0.1 + 0.02 * k), 1)
        r.finish(i * 0.5 + scale * 0.2, "length", 5, 21)
        r.server_timings = {"ttft_ms": 1.5, "decode_worker_id": "d0"}
        records.append(r)
    return records


def write_run(path: Path, label: str, scale: float, slo: dict[str, float] | None = None
              ) -> dict:
    records = make_records(scale)
    summary = summarize(records, slo or {"ttft_ms": 150.0})
    data = report.run_json(label, {"workload": {"kind": "fixed"}}, summary, {}, records,
                           request_rate=math.inf)
    report.save(path, data)
    return data


def test_json_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "a.json"
    data = write_run(path, "engine-a", 1.0)
    raw = json.loads(path.read_text())  # strict JSON: inf is written as a string
    assert raw["request_rate"] == "inf" and raw["kind"] == report.RUN_KIND
    loaded = report.load(path)
    assert loaded["summary"] == data["summary"]
    assert loaded["label"] == "engine-a"
    assert loaded["requests"] == make_records(1.0)  # RequestRecord objects again
    assert loaded["requests"][0].ttft_ms == pytest.approx(100.0)
    (tmp_path / "other.json").write_text('{"kind": "something-else"}')
    with pytest.raises(ValueError, match="not a results file"):
        report.load(tmp_path / "other.json")


def test_summary_table_contents() -> None:
    summary = summarize(make_records(1.0), {"ttft_ms": 150.0, "tpot_ms": 30.0})
    text = report.format_summary(summary, "run-x")
    assert "run-x" in text
    assert "4 completed, 0 failed, 0 cancelled (of 4 sent)" in text
    assert "ttft_ms <= 150, tpot_ms <= 30" in text
    ttft = next(line for line in text.splitlines() if line.startswith("TTFT"))
    assert ttft.split() == ["TTFT", "100.00", "100.00", "100.00", "100.00", "4"]
    tpot = next(line for line in text.splitlines() if line.startswith("TPOT"))
    assert tpot.split()[1] == "25.00"  # (200 - 100) ms / 4


def test_compare_runs_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                   ) -> None:
    write_run(tmp_path / "a.json", "engine-a", 1.0)
    write_run(tmp_path / "b.json", "engine-b", 2.0)  # every latency doubled
    assert compare.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                         "--plot-dir", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    lines = {line[:32].strip(): line[32:].split() for line in out.splitlines()[3:]}
    assert out.splitlines()[:2] == ["A = engine-a", "B = engine-b"]
    assert lines["TTFT p50 (ms)"] == ["100.00", "200.00", "+100.00", "2.00x"]
    assert lines["E2E p99 (ms)"] == ["200.00", "400.00", "+200.00", "2.00x"]
    assert lines["completed requests"] == ["4", "4", "+0", "1.00x"]
    # goodput: every request of A meets ttft <= 150 ms, none of B.
    assert lines["goodput (req/s)"][3] == "0.00x"
    assert (tmp_path / "plots" / "ttft_cdf.png").stat().st_size > 1000


def test_compare_warns_on_different_slos_and_rejects_bad_files(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_run(tmp_path / "a.json", "x", 1.0)
    write_run(tmp_path / "b.json", "x", 1.0, slo={"ttft_ms": 10.0})
    assert compare.main([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "SLOs differ" in out
    assert f"A = {tmp_path / 'a.json'}" in out  # same labels: files name the columns
    assert compare.main([str(tmp_path / "a.json"), str(tmp_path / "missing.json")]) == 2


def test_compare_sweeps_by_rate(tmp_path: Path) -> None:
    runs = []
    for rate, scale in ((1.0, 1.0), (2.0, 3.0)):
        records = make_records(scale)
        runs.append(report.run_json("s", {}, summarize(records), {}, records,
                                    request_rate=rate))
    report.save(tmp_path / "s1.json", report.sweep_json("s1", {}, runs))
    report.save(tmp_path / "s2.json", report.sweep_json("s2", {}, runs[1:]))
    text = compare.compare([str(tmp_path / "s1.json"), str(tmp_path / "s2.json")])
    assert "== request rate 2 req/s ==" in text and "rate 1 req/s" not in text
    ttft = next(line for line in text.splitlines() if line.startswith("TTFT p50"))
    assert ttft.split()[-4:] == ["300.00", "300.00", "+0.00", "1.00x"]
