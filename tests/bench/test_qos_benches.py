"""`splitserve bench slo` and `splitserve bench fairness` on the tiny model with short
phases: every phase runs against real processes and the printed comparison holds the
figures the JSON holds. (The measured results are in BENCHMARKS.md.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from splitserve.bench import fairness, slo


def test_slo_bench_refuses_what_would_miss_and_raises_goodput(
        tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = slo.main(["--model", str(tiny_llama), "--dtype", "float32", "--num-kv-blocks",
                   "256", "--threads", "1", "--capacity-duration", "3", "--duration", "4",
                   "--grace", "3", "--ttft-slo-ms", "300", "--out-dir", str(tmp_path)])
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert rc == 0, printed
    assert summary["offered_rps"] == pytest.approx(3 * summary["capacity_rps"])
    assert summary["refusal_ms"]["count"] > 0  # 3x overload: some are refused at once
    assert summary["goodput_slo"] > summary["goodput_plain"]
    assert f"goodput slo/plain = {summary['goodput_ratio']:.2f}" in printed


def test_fairness_bench_runs_all_three_phases(
        tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fair.json"
    rc = fairness.main(["--model", str(tiny_llama), "--dtype", "float32", "--threads", "1",
                        "--num-kv-blocks", "256", "--seconds", "3", "--warmup-seconds", "1",
                        "--flood-lead-seconds", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert rc == 0
    assert set(data["results"]) == {"alone", "fcfs", "vtc"}
    assert set(data["results"]["vtc"]) == {"flood", "light"}
    assert data["results"]["alone"]["light"]["requests"] > 0
    for phase in ("fcfs", "vtc"):  # only what was sent inside the window [0, 3] counts
        for client in ("flood", "light"):  # (send times are rounded to the millisecond)
            sends = [t for t, _ in data["results"][phase][client]["ttft_by_send_s"]]
            assert sends and min(sends) >= 0.0 and max(sends) <= 3.0, (phase, client, sends)
    for phase in ("fcfs", "vtc"):
        ratio = data["summary"][phase]["flood_over_light_tokens"]
        assert f"{phase}: tokens served flood/light = {ratio}" in printed
    # Fair share is the point: under VTC the light client is not crowded out (flood/light
    # smaller than under FCFS; cross-multiplied, as FCFS may leave light no token at all).
    tokens = {phase: [data["results"][phase][client]["output_tokens"]
                      for client in ("flood", "light")] for phase in ("fcfs", "vtc")}
    (fcfs_flood, fcfs_light), (vtc_flood, vtc_light) = tokens["fcfs"], tokens["vtc"]
    assert vtc_light > 0 and vtc_flood * fcfs_light < fcfs_flood * vtc_light, tokens
    assert "SPLITSERVE_API_KEYS" not in os.environ  # the bench's keys stayed with its processes


def test_fairness_bench_priority_scenario(tiny_llama: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "prio.json"
    rc = fairness.main(["--model", str(tiny_llama), "--dtype", "float32", "--threads", "1",
                        "--num-kv-blocks", "256", "--seconds", "3", "--warmup-seconds", "1",
                        "--flood-lead-seconds", "1",
                        "--scenario", "priority", "--max-inflight", "64", "--max-num-seqs",
                        "2", "--light-concurrency", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert rc == 0 and set(data["results"]) == {"alone", "fcfs", "priority"}
    fcfs, prio = (data["results"][p]["light"]["ttft_p50_s"] for p in ("fcfs", "priority"))
    assert prio < fcfs  # class 0 overtakes the flood's class 5 in the engine's queue
    assert "priority: tokens served flood/light" in capsys.readouterr().out


def test_a_request_sent_in_the_window_keeps_its_ttft_however_late_it_ends() -> None:
    tally = fairness.ClientTally()
    start, end = 100.0, 103.0
    tally.record(99.0, 0.5, 100.5, 4, start, end)  # sent before the window: tokens only
    tally.record(100.2, 0.1, 101.0, 8, start, end)  # sent and finished inside
    tally.record(102.5, 2.0, 105.0, 0, start, end)  # sent inside, its first token after
    tally.record(102.9, None, 103.5, 0, start, end)  # sent inside, no token at all
    row = tally.row(end - start)
    assert row["output_tokens"] == 12 and row["requests"] == 1
    # A crowded-out request's late first token is a TTFT sample, not dropped with it.
    assert row["ttft_by_send_s"] == [[0.2, 0.1], [2.5, 2.0]]
    assert row["ttft_p50_s"] == 2.0
