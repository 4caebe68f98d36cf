"""The speed probe (sim.probe) a profile and a sweep both take, `bench serve`'s hook that
runs it between a sweep's runs, and `bench simulate` at the speed level the probes saw."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from splitserve import cli
from splitserve.bench import disagg, report, serve
from splitserve.bench.metrics import parse_slo
from splitserve.sim import sweep
from splitserve.sim.probe import SpeedProbe
from splitserve.sim.profile import Profile, ProfiledStepTimes
from tests.bench.fake_openai import FakeOpenAI
from tests.sim.test_sim_cluster import flat_model


def test_a_probe_process_answers_each_measurement_and_exits_with_its_owner(
        tiny_llama: Path) -> None:
    with SpeedProbe(str(tiny_llama), "float32", threads=1) as probe:
        first, second = probe.measure(0.2), probe.measure(0.0)
        process = probe.process
    assert first > 0 and second > 0
    assert process.poll() == 0  # the end of its input ended it


def test_a_probe_of_a_model_that_does_not_load_says_so(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="the speed probe exited"):
        SpeedProbe(str(tmp_path / "no-such-model"), "float32", threads=1)


# Stand-ins for the probe child, to test the pipe's reading and deadlines only.
_SILENT = "import time; time.sleep(60)"
_READY_THEN_SILENT = 'print("{\\"ready\\": true}", flush=True); import time; time.sleep(60)'
_SPLIT_LINES = """
import sys, time
sys.stdout.write('loading...\\n{"rea'); sys.stdout.flush(); time.sleep(0.2)
print('dy": true}', flush=True)
for line in sys.stdin:
    print('{"median_ms": %s}' % (float(line) + 1.5), flush=True)
"""


def _stand_in(code: str, **timeouts: float) -> SpeedProbe:
    return SpeedProbe("unused", "float32", 1, command=[sys.executable, "-c", code], **timeouts)


def test_a_probe_that_never_loads_is_killed_at_its_deadline() -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not answer in time"):
        _stand_in(_SILENT, load_timeout_s=0.5)
    assert time.monotonic() - start < 30


def test_a_probe_that_hangs_in_a_measurement_is_killed_and_the_call_raises() -> None:
    probe = _stand_in(_READY_THEN_SILENT, answer_slack_s=0.5)
    with pytest.raises(TimeoutError):
        probe.measure(0.0)
    assert probe.process.wait(10) != 0  # killed, not left behind
    probe.close()


def test_the_probes_answers_are_read_whole_across_partial_writes() -> None:
    with _stand_in(_SPLIT_LINES) as probe:
        assert probe.measure(2.0) == 3.5
        assert probe.measure(0.5) == 2.0


@pytest.fixture
def fake() -> Iterator[str]:
    server = FakeOpenAI(token_delay_s=0.001)
    yield server.start()
    server.stop()


def test_bench_serve_records_the_hosts_probes_around_each_run(fake: str, tmp_path: Path
                                                               ) -> None:
    calls: list[int] = []

    def probe_host() -> dict[str, Any]:
        calls.append(len(calls))
        return {"speed_probe_ms": 10.0 + len(calls)}

    out = tmp_path / "sweep.json"
    assert serve.main(["--target", fake, "--workload", "fixed", "--input-len", "8",
                       "--output-len", "3", "--num-requests", "4", "--sweep-rates", "50,100",
                       "--no-progress", "--out", str(out)], probe_host=probe_host) == 0
    runs = json.loads(out.read_text())["runs"]
    assert len(calls) == 3  # before each of the 2 runs and after the last
    assert [r["host_probe"] for r in runs] == [
        {"before": {"speed_probe_ms": 11.0}, "after": {"speed_probe_ms": 12.0}},
        {"before": {"speed_probe_ms": 12.0}, "after": {"speed_probe_ms": 13.0}}]
    plain = tmp_path / "plain.json"
    assert serve.main(["--target", fake, "--workload", "fixed", "--input-len", "8",
                       "--output-len", "3", "--num-requests", "2", "--no-progress",
                       "--out", str(plain)]) == 0
    assert "host_probe" not in json.loads(plain.read_text())


def _probed(before: float, after: float) -> dict[str, Any]:
    return {"host_probe": {"before": {"speed_probe_ms": before},
                           "after": {"speed_probe_ms": after}}}


def test_the_speed_level_is_the_runs_probes_over_the_profiles() -> None:
    profile = dataclasses.replace(flat_model().profile, speed_probe_ms=20.0)
    assert sweep.speed_level(_probed(20.0, 45.0), profile) == pytest.approx(1.5)  # sqrt(900)
    assert sweep.speed_level(_probed(16.0, 16.0), profile) == pytest.approx(0.8)
    assert sweep.speed_level({}, profile) is None  # a sweep without probes
    assert sweep.speed_level(_probed(0.0, 16.0), profile) is None
    assert sweep.speed_level({"host_probe": {"before": {}}}, profile) is None
    assert sweep.speed_level(_probed(20.0, 20.0), flat_model().profile) is None  # no probe
    # Probes of another engine setting than the profile's are not its speed.
    same = {"model": profile.model, "dtype": profile.dtype, "threads": profile.threads}
    run = _probed(20.0, 45.0)
    for probe in run["host_probe"].values():
        probe.update(same)
    assert sweep.speed_level(run, profile) == pytest.approx(1.5)
    run["host_probe"]["after"]["threads"] = profile.threads + 1
    assert sweep.speed_level(run, profile) is None
    with pytest.raises(ValueError, match="speed_probe_ms"):
        dataclasses.replace(profile, speed_probe_ms=-1.0)


def test_simulate_runs_each_rate_at_its_probes_level(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The measured sweep is the simulation at the profile's speed, its runs probed at 1.25x
    # the profile's probe: with the level, the decode steps of a slower host are predicted
    # slower, the prompts' steps not; --no-speed-level reproduces the measurement exactly.
    profile = dataclasses.replace(flat_model().profile, speed_probe_ms=8.0)
    path = tmp_path / "profile.json"
    profile.save(path)
    assert Profile.load(path).speed_probe_ms == 8.0
    model = ProfiledStepTimes(profile)
    workload = sweep.parse_workload(sweep.DEFAULT_WORKLOAD_ARGS, seed=0)
    slo = parse_slo("tpot_ms=90,ttft_ms=5000")
    for name in ("colocated", "disaggregated"):
        runs = [{"request_rate": rate, "requests": [], **_probed(10.0, 10.0),
                 "summary": sweep.simulate_summary(sweep.deployment_of(name), model,
                                                   sweep.make_trace(workload, rate, 12), slo)}
                for rate in (1.0, 2.0)]
        report.save(tmp_path / f"{name}.json", report.sweep_json(name, {}, runs))
    out = tmp_path / "sim.json"
    base = ["bench", "simulate", "--profile", str(path), "--num-requests", "12",
            "--measured-dir", str(tmp_path), "--out", str(out), "--replicates", "1"]
    assert cli.main(base) == 0
    assert "speed level (the sweep's probes over the profile's 8.00 ms): rate 1 1.250" in (
        capsys.readouterr().out)
    data = json.loads(out.read_text())
    assert data["speed_levels"]["colocated"] == {"1.0": 1.25, "2.0": 1.25}
    tpot = {r["rate"]: r for r in data["configs"]["colocated"] if r["figure"] == "tpot_ms p50"}
    assert tpot[1.0]["error"] == pytest.approx(0.25)  # 10 ms decode steps, run at 12.5
    ttft = {r["rate"]: r for r in data["configs"]["disaggregated"]
            if r["figure"] == "ttft_ms p50"}
    assert ttft[1.0]["error"] == pytest.approx(0.0)  # a prefill worker's prompt steps
    assert cli.main([*base, "--no-speed-level"]) == 0
    text = capsys.readouterr().out
    assert "speed level" not in text and "every rate at the profile's speed" not in text
    data = json.loads(out.read_text())
    assert all(r["error"] == pytest.approx(0.0) for r in data["configs"]["colocated"]
               if r["error"] is not None)


def test_bench_disagg_probes_the_host_around_each_run(tiny_llama: Path, tmp_path: Path) -> None:
    # A real colocated deployment (router + 2 decode workers as processes) and a probe process.
    assert disagg.main(["--model", str(tiny_llama), "--only", "colocated", "--rates", "8,16",
                        "--num-requests", "3", "--speed-probe-s", "0.1",
                        "--workload-args", "--input-len 8 --output-len 4 --long-fraction 0",
                        "--out-dir", str(tmp_path)]) == 0
    runs = json.loads((tmp_path / "colocated.json").read_text())["runs"]
    assert [r["request_rate"] for r in runs] == [8.0, 16.0]
    assert all(r["summary"]["completed"] == 3 for r in runs)
    probes = [r["host_probe"] for r in runs]
    assert all(p[k]["speed_probe_ms"] > 0 and p[k]["threads"] == 1
               and p[k]["model"] == str(tiny_llama) for p in probes for k in ("before", "after"))
    assert probes[0]["after"] == probes[1]["before"]  # one probe between the two runs
    with pytest.raises(SystemExit):
        disagg.main(["--speed-probe-s", "-1"])


def test_simulate_says_why_it_runs_every_rate_at_the_profiles_speed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = flat_model()
    workload = sweep.parse_workload(sweep.DEFAULT_WORKLOAD_ARGS, seed=0)
    slo = parse_slo("tpot_ms=90,ttft_ms=5000")
    summary = sweep.simulate_summary(sweep.deployment_of("colocated"), model,
                                     sweep.make_trace(workload, 1.0, 6), slo)
    run = {"request_rate": 1.0, "requests": [], "summary": summary}
    report.save(tmp_path / "colocated.json", report.sweep_json("colocated", {}, [run]))
    base = ["bench", "simulate", "--num-requests", "6", "--measured-dir", str(tmp_path),
            "--replicates", "1"]
    unprobed = tmp_path / "unprobed.json"
    model.profile.save(unprobed)
    assert cli.main([*base, "--profile", str(unprobed)]) == 0
    assert "every rate at the profile's speed: the profile has no speed probe" in (
        capsys.readouterr().out)
    probed = tmp_path / "probed.json"
    dataclasses.replace(model.profile, speed_probe_ms=8.0).save(probed)
    assert cli.main([*base, "--profile", str(probed)]) == 0
    assert "the sweep has no speed probes of the profile's engine setting" in (
        capsys.readouterr().out)
