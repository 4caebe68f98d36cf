"""Smoke tests of the commands on the tiny model: profile, bench simulate, plan, bench route."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from splitserve import cli
from splitserve.bench import report
from splitserve.bench.metrics import parse_slo
from splitserve.sim import route_bench, sweep
from splitserve.sim.profile import Profile, ProfiledStepTimes


@pytest.fixture(scope="module")
def tiny_profile(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("profile") / "tiny.json"
    assert cli.main(["profile", "--model", str(tiny_llama), "--prefill-tokens", "8,32",
                     "--decode-batches", "1,2", "--decode-contexts", "8,24", "--repeats", "1",
                     "--no-serving", "--no-kv", "--kv-bandwidth", "5e8",
                     "--speed-probe-s", "1", "--speed-period-s", "0.25",
                     "--out", str(out)]) == 0
    return out


def test_profile_records_the_grid_and_the_machine(tiny_profile: Path) -> None:
    profile = Profile.load(tiny_profile)
    assert profile.prefill_tokens == [8, 32] and len(profile.prefill_ms) == 2
    assert profile.decode_batches == [1, 2] and profile.decode_contexts == [8, 24]
    assert all(ms > 0 for row in profile.decode_ms for ms in row)
    # tiny model: 2 layers x 2 KV heads x head_dim 16, K and V, fp32
    assert profile.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4
    assert profile.kv_bandwidth_bytes_per_s == 5e8
    assert profile.hardware["cpu_count"] >= 1 and profile.threads == 1
    # the speed drift over 1 s of batch-1 decode steps, in periods of 0.25 s
    assert profile.speed_period_s == 0.25 and 0.0 <= profile.speed_sigma < 1.0
    assert profile.speed_probe_ms > 0  # the probe's median, what a sweep's probes compare with
    # co-run factors measured against real second engines (values depend on the machine)
    assert set(profile.corun) == {"prefill", "decode"}
    assert all(set(row) == {"prefill", "decode"} and all(f > 0 for f in row.values())
               for row in profile.corun.values())


def test_profile_measures_the_serving_overheads_on_a_local_deployment(
        tiny_llama: Path, tmp_path: Path) -> None:
    # Router + workers as processes: the serving overheads, the remote prefills timed
    # again while the decode worker decodes a long stream (a ratio of two medians) and that
    # stream's token gaps meanwhile against before, and a colocated pair's streams one and
    # two at a time.
    out = tmp_path / "serving.json"
    assert cli.main(["profile", "--model", str(tiny_llama), "--prefill-tokens", "8,64",
                     "--decode-batches", "1", "--decode-contexts", "8,96", "--repeats", "1",
                     "--no-corun", "--no-kv", "--speed-probe-s", "0",  # (tiny_profile's)
                     "--out", str(out)]) == 0
    serving = Profile.load(out).serving
    assert serving.prefill_under_decode > 0 and serving.decode_under_decode > 0
    assert serving.decode_under_prefill > 0
    assert serving.ttft_local_ms >= 0 and serving.ttft_remote_ms >= 0


def test_simulate_prints_predicted_beside_measured(tiny_profile: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # A "measured" sweep that is the simulation itself, with goodput doubled: errors are
    # 0% everywhere but goodput's -50%.
    model = ProfiledStepTimes(Profile.load(tiny_profile))
    workload = sweep.parse_workload(sweep.DEFAULT_WORKLOAD_ARGS, seed=0)
    slo = parse_slo("tpot_ms=90,ttft_ms=5000")
    for name in ("colocated", "disaggregated"):
        runs = []
        for rate in (1.0, 3.0):
            summary = sweep.simulate_summary(sweep.deployment_of(name), model,
                                             sweep.make_trace(workload, rate, 12), slo)
            summary["goodput"] *= 2
            runs.append({"request_rate": rate, "summary": summary, "requests": []})
        report.save(tmp_path / f"{name}.json", report.sweep_json(name, {}, runs))
    out = tmp_path / "sim.json"
    assert cli.main(["bench", "simulate", "--profile", str(tiny_profile), "--num-requests", "12",
                     "--measured-dir", str(tmp_path), "--out", str(out),
                     "--replicates", "1"]) == 0
    text = capsys.readouterr().out
    assert "=== colocated (colocated x2)" in text and "=== disaggregated (1P+1D)" in text
    rows = json.loads(out.read_text())["configs"]["disaggregated"]
    assert {r["rate"] for r in rows} == {1.0, 3.0}
    errors = {r["figure"]: r["error"] for r in rows if r["rate"] == 3.0}
    assert errors["goodput"] == pytest.approx(-0.5)
    assert errors["ttft_ms p99"] == pytest.approx(0.0) and errors["tpot_ms p50"] == 0.0
    # Replicates under a drift: each figure the median of the runs, printed with its band.
    assert cli.main(["bench", "simulate", "--profile", str(tiny_profile), "--num-requests", "12",
                     "--measured-dir", str(tmp_path), "--out", str(out),
                     "--speed-sigma", "0.2", "--speed-period-s", "0.5"]) == 0
    text = capsys.readouterr().out
    assert f"{sweep.DEFAULT_REPLICATES} runs per rate under a speed drift of sigma 0.200" in text
    assert "tpot_ms p99 " in text and "] / " in text  # "median [p10-p90] / measured"
    data = json.loads(out.read_text())
    assert data["replicates"] == sweep.DEFAULT_REPLICATES and data["speed_sigma"] == 0.2
    for bad in (["--replicates", "0"], ["--replicates", "3", "--speed-sigma", "0"],
                ["--speed-sigma", "-1"]):
        with pytest.raises(SystemExit):
            cli.main(["bench", "simulate", "--profile", str(tiny_profile), *bad])
    assert "--replicates" in capsys.readouterr().err
    rows = data["configs"]["colocated"]
    assert all(r["runs"] == sweep.DEFAULT_REPLICATES for r in rows)
    assert any(r["band"][0] < r["band"][1] for r in rows)  # the drifts moved some figure


def test_plan_prints_ranked_configurations(tiny_profile: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plan", "--rate", "2", "--slo", "ttft_ms=2000,tpot_ms=100", "--profile",
                     str(tiny_profile), "--gpus", "2", "--num-requests", "20"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "3 configurations on 1..2 devices" in lines[0]
    assert sum("/device" in line for line in lines) == 3
    assert lines[-1].split(":")[0] in ("colocated wins", "disaggregation wins")


def test_route_bench_runs_on_a_small_cluster(capsys: pytest.CaptureFixture[str]) -> None:
    assert route_bench.main(["--num-workers", "20", "--decisions", "50",
                             "--reference-decisions", "20", "--concurrency", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "router/target" in lines[1]
    rows = [line.split() for line in lines[2:]]
    assert [row[:2] for row in rows] == [["memory", p] for p in route_bench.POLICIES]
    assert all(float(row[2]) > 0 and float(row[3]) > 0 for row in rows)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server on PATH")
def test_route_bench_runs_on_redis(capsys: pytest.CaptureFixture[str]) -> None:
    assert route_bench.main(["--num-workers", "20", "--decisions", "50", "--policy", "kv_aware",
                             "--reference-decisions", "0", "--heartbeat-s", "0.01",
                             "--redis"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [row[:2] for row in rows] == [["memory", "kv_aware"], ["redis", "kv_aware"]]
    assert float(rows[1][3]) > 0
