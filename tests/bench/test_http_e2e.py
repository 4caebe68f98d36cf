"""`splitserve bench serve` end to end against a stand-in OpenAI-compatible server.

The server (fake_openai.FakeOpenAI) is a small aiohttp app on 127.0.0.1 that streams fixed
tokens with small sleeps, standing in for an external engine such as vLLM.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from splitserve.bench import compare, serve
from tests.bench.fake_openai import FakeOpenAI

Server = Callable[..., tuple[FakeOpenAI, str]]


@pytest.fixture
def server() -> Iterator[Server]:
    started: list[FakeOpenAI] = []

    def start(**kwargs: object) -> tuple[FakeOpenAI, str]:
        fake = FakeOpenAI(**kwargs)  # type: ignore[arg-type]
        url = fake.start()
        started.append(fake)
        return fake, url

    yield start
    for fake in started:
        fake.stop()


def bench(*argv: str) -> int:
    return serve.main([*argv, "--no-progress"])


def test_completions_run_counts_json_and_plots(server: Server, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    fake, url = server()
    out, plots = tmp_path / "r.json", tmp_path / "plots"
    rc = bench("--target", url, "--workload", "fixed", "--input-len", "30", "--output-len",
               "6", "--num-requests", "12", "--request-rate", "200", "--seed", "1",
               "--slo", "ttft_ms=5000,tpot_ms=1000", "--out", str(out),
               "--plot-dir", str(plots))
    assert rc == 0
    assert len(fake.bodies) == 12 and set(fake.paths) == {"/v1/completions"}
    body = fake.bodies[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 6 and body["ignore_eos"] is True
    assert body["temperature"] == 0.0 and body["model"] == "fake-model"
    assert len(body["prompt"].split()) == 30
    data = json.loads(out.read_text())
    s = data["summary"]
    assert (s["completed"], s["failed"], s["cancelled"]) == (12, 0, 0)
    assert s["total_output_tokens"] == 72 and s["total_prompt_tokens"] == 360
    assert s["prompt_tokens_reported"] is True
    assert s["good_requests"] == 12 and s["itl_ms"]["count"] == 12 * 5
    assert data["stopped_by"] == "num_requests"
    assert [r["index"] for r in data["requests"]] == list(range(12))
    req = data["requests"][0]
    assert len(req["chunk_s"]) == 6 and req["finish_reason"] == "length"
    assert req["send_s"] <= req["chunk_s"][0] <= req["chunk_s"][-1] <= req["end_s"]
    for name in ("ttft_cdf", "tpot_cdf", "e2e_cdf", "itl_cdf", "timeline"):
        assert (plots / f"{name}.png").stat().st_size > 1000
    table = capsys.readouterr().out
    assert "12 completed, 0 failed, 0 cancelled (of 12 sent)" in table


def test_duration_run_stops_by_itself(server: Server, tmp_path: Path) -> None:
    fake, url = server(token_delay_s=0.01)
    out = tmp_path / "d.json"
    start = time.monotonic()
    rc = bench("--target", url, "--workload", "synthetic", "--max-output-len", "20",
               "--max-input-len", "64", "--request-rate", "30", "--duration", "0.6",
               "--grace", "5", "--out", str(out))
    elapsed = time.monotonic() - start
    data = json.loads(out.read_text())
    assert rc == 0 and data["stopped_by"] == "duration"
    assert elapsed < 10  # no --num-requests: only --duration stopped it
    requests = data["requests"]
    assert 3 <= len(requests) <= 60 and len(fake.bodies) == len(requests)
    assert all(r["scheduled_s"] < 0.6 for r in requests)
    assert all(r["status"] == "ok" for r in requests)  # the grace period let them finish
    assert data["summary"]["total_output_tokens"] == sum(b["max_tokens"] for b in fake.bodies)


def test_chat_multi_token_events_without_usage(server: Server, tmp_path: Path) -> None:
    fake, url = server(tokens_per_event=3, send_usage=False)
    out = tmp_path / "c.json"
    rc = bench("--target", url, "--workload", "multi-turn", "--num-turns", "2",
               "--input-len", "5", "--output-len", "7", "--num-requests", "16",
               "--concurrency", "4", "--model", "m1", "--out", str(out))
    assert rc == 0 and set(fake.paths) == {"/v1/chat/completions"}
    assert fake.peak_in_flight <= 4
    assert {b["model"] for b in fake.bodies} == {"m1"}
    assert sorted(len(b["messages"]) for b in fake.bodies) == [1] * 8 + [3] * 8
    data = json.loads(out.read_text())
    # No usage: tokens are counted as content events (7 tokens in events of 3, 3, 1).
    assert all(r["output_tokens"] == 3 for r in data["requests"])
    assert data["summary"]["prompt_tokens_reported"] is False
    assert data["summary"]["total_prompt_tokens"] == 8 * 5 + 8 * (5 + 7 + 5)  # estimates


def test_http_errors_are_counted(server: Server, tmp_path: Path) -> None:
    fake, url = server(fail_every=3)
    out = tmp_path / "e.json"
    rc = bench("--target", url, "--workload", "fixed", "--input-len", "4", "--output-len",
               "3", "--num-requests", "9", "--concurrency", "1", "--api", "chat",
               "--out", str(out))
    assert rc == 0
    s = json.loads(out.read_text())["summary"]
    assert (s["completed"], s["failed"]) == (6, 3)
    assert list(s["errors"]) == ['HTTP 503: {"error": {"message": "overloaded"}}']


def test_sweep_writes_runs_and_plots(server: Server, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    fake, url = server()
    out, plots = tmp_path / "s.json", tmp_path / "p"
    rc = bench("--target", url, "--workload", "fixed", "--input-len", "8", "--output-len",
               "4", "--num-requests", "6", "--sweep-rates", "50,inf", "--out", str(out),
               "--plot-dir", str(plots), "--label", "fake-engine")
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["kind"] == "splitserve.bench.serve/sweep" and data["label"] == "fake-engine"
    assert [r["request_rate"] for r in data["runs"]] == [50.0, "inf"]
    assert all(r["summary"]["completed"] == 6 for r in data["runs"])
    # Same seed at every rate: the same prompts. At rate inf all six are in flight at once, so
    # the order they reach the server in is the scheduler's, not the workload's.
    first, second = ([b["prompt"] for b in part] for part in (fake.bodies[:6], fake.bodies[6:]))
    assert len(set(first)) == 6 and sorted(first) == sorted(second)
    for name in ("sweep_goodput", "sweep_latency", "ttft_cdf"):
        assert (plots / f"{name}.png").stat().st_size > 1000
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split()[:2] == ["req", "rate"]
    assert [row.split()[0] for row in rows[1:3]] == ["50.00", "inf"]


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench("--target", "ftp://x", "--num-requests", "1") == 2
    assert bench("--target", "http://127.0.0.1:1", "--slo", "bogus=1") == 2
    assert bench("--target", "http://127.0.0.1:1", "--duration", "1") == 2  # inf rate
    assert "error" in capsys.readouterr().err


def test_slow_server_is_cancelled_after_grace(server: Server, tmp_path: Path) -> None:
    fake, url = server(token_delay_s=0.5)  # 20 tokens: ~10 s per request
    out = tmp_path / "slow.json"
    start = time.monotonic()
    rc = bench("--target", url, "--workload", "fixed", "--input-len", "4", "--output-len",
               "20", "--request-rate", "20", "--duration", "0.3", "--grace", "0.3",
               "--out", str(out))
    elapsed = time.monotonic() - start
    data = json.loads(out.read_text())
    assert rc == 1  # nothing completed
    assert elapsed < 5
    statuses = {r["status"] for r in data["requests"]}
    assert statuses == {"cancelled"} and data["summary"]["cancelled"] == len(fake.bodies)
    assert all(0 < len(r["chunk_s"]) < 20 for r in data["requests"])  # partial streams kept
    deadline = time.monotonic() + 5
    while fake.in_flight and time.monotonic() < deadline:  # the server saw the disconnects
        time.sleep(0.02)
    assert fake.in_flight == 0


def test_bad_dataset_exits_2_before_sending(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 3}\n')
    assert bench("--target", "http://127.0.0.1:1", "--dataset", str(bad)) == 2
    assert bench("--target", "http://127.0.0.1:1", "--dataset", str(tmp_path / "no")) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1" in err and "No such file" in err


def test_warmup_requests_are_sent_but_not_measured(server: Server, tmp_path: Path) -> None:
    fake, url = server()
    out = tmp_path / "w.json"
    assert bench("--target", url, "--workload", "fixed", "--input-len", "6", "--output-len",
                 "2", "--num-requests", "3", "--warmup", "2", "--out", str(out)) == 0
    assert len(fake.bodies) == 5
    data = json.loads(out.read_text())
    assert data["summary"]["num_requests"] == 3
    measured = {r["prompt"] for r in fake.bodies[2:]}
    assert not measured & {r["prompt"] for r in fake.bodies[:2]}  # warm-up prompts differ


def test_vllm_result_format_and_compare_reads_it(server: Server, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    fake, url = server()
    ours, theirs = tmp_path / "ours.json", tmp_path / "vllm.json"
    common = ["--target", url, "--workload", "fixed", "--input-len", "30", "--output-len", "6",
              "--num-requests", "8", "--concurrency", "2", "--seed", "3",
              "--slo", "ttft_ms=5000"]
    assert bench(*common, "--out", str(ours)) == 0
    assert bench(*common, "--out", str(theirs), "--result-format", "vllm") == 0
    flat = json.loads(theirs.read_text())
    nested = json.loads(ours.read_text())["summary"]
    assert (flat["completed"], flat["failed"], flat["num_prompts"]) == (8, 0, 8)
    assert flat["total_input_tokens"] == 240 and flat["total_output_tokens"] == 48
    assert flat["max_concurrency"] == 2 and flat["request_rate"] == "inf"
    for theirs_name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p50", "p90", "p99"):
            assert isinstance(flat[f"{stat}_{theirs_name}_ms"], float)
    assert flat["median_ttft_ms"] == flat["p50_ttft_ms"] > 0
    assert flat["mean_itl_ms"] > 0 and flat["request_goodput"] > 0
    assert 0 < flat["duration"] and nested["completed"] == 8
    capsys.readouterr()
    assert compare.main([str(ours), str(theirs)]) == 0
    table = capsys.readouterr().out
    assert "TTFT p99 (ms)" in table and "completed requests" in table


def test_a_fresh_seed_per_run_unless_given(server: Server, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    fake, url = server()
    seeds = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.json"
        assert bench("--target", url, "--workload", "synthetic", "--num-requests", "2",
                     "--max-input-len", "32", "--max-output-len", "4", "--out", str(out)) == 0
        seeds.append(json.loads(out.read_text())["config"]["workload"]["seed"])
        assert f"seed: {seeds[-1]}" in capsys.readouterr().err
    assert seeds[0] != seeds[1]
    out = tmp_path / "fixed.json"
    assert bench("--target", url, "--workload", "synthetic", "--num-requests", "2",
                 "--max-input-len", "32", "--max-output-len", "4", "--seed", "7",
                 "--out", str(out)) == 0
    assert json.loads(out.read_text())["config"]["workload"]["seed"] == 7


def test_a_connection_closed_before_any_response_is_resent_once(server: Server,
                                                                tmp_path: Path) -> None:
    """Not the server's failure: the harness resends on a fresh connection and counts it."""
    fake, url = server(drop_first=1)
    out = tmp_path / "c.json"
    rc = bench("--target", url, "--workload", "fixed", "--input-len", "4", "--output-len",
               "3", "--num-requests", "6", "--concurrency", "1", "--out", str(out))
    assert rc == 0
    s = json.loads(out.read_text())["summary"]
    assert (s["completed"], s["failed"], s["connection_retries"]) == (6, 0, 1)
    assert len(fake.bodies) == 6
