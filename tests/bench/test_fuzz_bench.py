"""`splitserve bench fuzz` on the tiny model with small counts: every case is sent and
counted, every target is measured and met; and each target fails on the figures that
should fail it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from splitserve.bench import fuzz, fuzz_report
from splitserve.bench.fuzz_cases import grpc_cases, http_cases, run_examples
from splitserve.bench.fuzz_service import FuzzService

TARGETS = [
    "HTTP cases: 5xx responses", "HTTP cases: no response", "gRPC cases: failing statuses",
    "processes exited", "tracebacks in the logs", "router RSS end/start",
    "normal request after each 1,000 cases", "2 x 5 MiB bodies at once: 413",
    "2 x 5 MiB bodies at once: router RSS growth",
    "2 x 5 MiB bodies at once: workers registered",
]


def test_fuzz_bench_sends_every_case_and_passes(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fuzz.json"
    rc = fuzz.main(["--http-cases", "50", "--grpc-cases", "20", "--big-bodies", "2",
                    "--big-body-mb", "5", "--seed", "1", "--log-dir", str(tmp_path / "logs"),
                    "--out", str(out)])
    printed = capsys.readouterr().out
    figures = json.loads(out.read_text())
    assert rc == 0, printed
    assert figures["passed"] and printed.rstrip().endswith("PASS")
    assert [row["target"] for row in figures["targets"]] == TARGETS
    assert all(row["pass"] for row in figures["targets"]), figures["targets"]
    assert figures["http"]["sent"] == {"api": 25, "garbage": 13, "route": 12}
    assert sum(figures["http"]["statuses"].values()) == 50
    assert figures["grpc"]["sent"] == {"request": 8, "bytes": 8, "truncated": 4}
    assert sum(figures["grpc"]["statuses"].values()) == 20
    assert "400" in figures["http"]["statuses"]  # bad input was refused, not served
    assert "INVALID_ARGUMENT" in figures["grpc"]["statuses"]
    assert [(p["phase"], p["api"], p["status"]) for p in figures["probes"]] == [
        ("http", "http", "200"), ("http", "grpc", "OK"),
        ("grpc", "http", "200"), ("grpc", "grpc", "OK")]
    posts = figures["big_bodies"]["posts"]
    assert [p["status"] for p in posts] == [413, 413]
    assert figures["big_bodies"]["live_workers"] == ["decode-0"]
    assert figures["tracebacks"] == {"router": 0, "decode-0": 0}
    assert figures["exited"] == {}
    assert (tmp_path / "logs" / "router.err").exists()


def _passing_figures() -> dict[str, Any]:
    post = {"status": 413, "seconds": 0.01, "sent_bytes": 0, "error": ""}
    return {
        "http": {"statuses": {"200": 3, "400": 40}}, "grpc": {"statuses": {"OK": 1}},
        "exited": {}, "tracebacks": {"router": 0, "decode-0": 0},
        "rss_start_bytes": 100 * 2**20, "rss_end_bytes": 105 * 2**20,
        "probes": [{"status": "200", "seconds": 0.02}, {"status": "OK", "seconds": 0.01}],
        "big_bodies": {"posts": [post, dict(post)], "rss_before_bytes": 100 * 2**20,
                       "rss_peak_bytes": 110 * 2**20, "live_workers": ["decode-0"],
                       "heartbeat_trouble": 0},
    }


@pytest.mark.parametrize("target,change", [
    ("HTTP cases: 5xx responses", lambda f: f["http"]["statuses"].update({"500": 1})),
    ("HTTP cases: no response",
     lambda f: f["http"]["statuses"].update({"no response: RemoteDisconnected": 1})),
    ("gRPC cases: failing statuses", lambda f: f["grpc"]["statuses"].update({"INTERNAL": 1})),
    ("gRPC cases: failing statuses", lambda f: f["grpc"]["statuses"].update({"UNKNOWN": 2})),
    ("gRPC cases: failing statuses",
     lambda f: f["grpc"]["statuses"].update({"OK, finish error": 1})),
    ("gRPC cases: failing statuses", lambda f: f.pop("grpc")),  # not run: the router died
    ("processes exited", lambda f: f["exited"].update({"router": -11})),
    ("tracebacks in the logs", lambda f: f["tracebacks"].update({"decode-0": 1})),
    ("router RSS end/start", lambda f: f.update(rss_end_bytes=111 * 2**20)),
    ("normal request after each 1,000 cases", lambda f: f["probes"][0].update(seconds=1.5)),
    ("normal request after each 1,000 cases",
     lambda f: f["probes"][1].update(status="UNAVAILABLE")),
    ("2 x 5 MiB bodies at once: 413", lambda f: f["big_bodies"]["posts"][1].update(seconds=0.2)),
    ("2 x 5 MiB bodies at once: 413",
     lambda f: f["big_bodies"]["posts"][0].update(status=0, seconds=None)),
    ("2 x 5 MiB bodies at once: router RSS growth",
     lambda f: f["big_bodies"].update(rss_peak_bytes=151 * 2**20)),
    ("2 x 5 MiB bodies at once: workers registered",
     lambda f: f["big_bodies"].update(live_workers=[])),
    ("2 x 5 MiB bodies at once: workers registered",
     lambda f: f["big_bodies"].update(heartbeat_trouble=1)),
])
def test_each_target_fails_on_its_own_failure(target: str, change: Any) -> None:
    args = argparse.Namespace(http_cases=43, grpc_cases=1, big_bodies=2, big_body_mb=5.0)
    rows = fuzz_report.targets(_passing_figures(), args)
    assert [r["target"] for r in rows] == TARGETS and all(r["pass"] for r in rows), rows
    figures = _passing_figures()
    change(figures)
    failed = [r["target"] for r in fuzz_report.targets(figures, args) if not r["pass"]]
    assert failed == [target]


def test_cases_drawn_with_a_seed_repeat_and_are_counted() -> None:
    def draw(strategy: Any, n: int, seed: int) -> list[Any]:
        got: list[Any] = []
        run_examples(strategy, n, got.append, seed=seed)
        return got

    first = draw(http_cases()["api"], 30, seed=7)
    assert len(first) == 30 and first == draw(http_cases()["api"], 30, seed=7)
    assert {c.path for c in first} <= {"/v1/completions", "/v1/chat/completions"}
    for case in first:  # accepted requests stay short
        body = json.loads(case.body)
        for key in ("max_tokens", "max_completion_tokens"):
            value = body.get(key)
            assert not (type(value) is int and 4 < value < 2**32), body
    raw = draw(grpc_cases()["request"], 20, seed=3)
    assert len(raw) == 20 and raw == draw(grpc_cases()["request"], 20, seed=3)


def test_split_divides_a_batch_by_share() -> None:
    assert fuzz._split(1000, fuzz.HTTP_SHARES) == {"api": 500, "garbage": 250, "route": 250}
    assert fuzz._split(20, fuzz.GRPC_SHARES) == {"request": 8, "bytes": 8, "truncated": 4}
    assert sum(fuzz._split(7, fuzz.GRPC_SHARES).values()) == 7


def test_the_logs_are_read_for_tracebacks_and_heartbeat_trouble(tmp_path: Path) -> None:
    (tmp_path / "router.out").write_text("READY router 127.0.0.1:1 cluster x http y\n")
    (tmp_path / "router.err").write_text(
        "INFO fine\nERROR aiohttp.server: Error handling request\n"
        "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n    g()\n"
        "ValueError: boom\nINFO later\n")
    (tmp_path / "decode-0.out").write_text("")
    (tmp_path / "decode-0.err").write_text(
        "WARNING presence: heartbeat of decode-0 failed: deadline\n"
        "WARNING presence: worker decode-0 was not live in the store; registering again\n")
    procs: Any = {"router": None, "decode-0": None}  # only their names are read
    service = FuzzService(tmp_path, procs=procs)
    assert service.tracebacks() == {"router": 1, "decode-0": 0}
    assert service.traceback_excerpts() == [
        "[router]\nTraceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
        "    g()\nValueError: boom"]
    assert service.heartbeat_trouble() == 2
