"""`splitserve bench peer` on the tiny model: without a llama-server binary the peer rows
are skipped with the reason, and SplitServe's served and offline rows run for real (router
and decode worker processes, then the engine in process) with the served/offline ratio.
(The llama.cpp rows were run by hand against a built llama-server: BENCHMARKS.md.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from splitserve.bench import main as bench_main


def test_peer_bench_without_a_peer(tiny_llama: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "peer.json"
    rc = bench_main(["peer", "--model", str(tiny_llama), "--precisions", "fp32",
                     "--threads", "1", "--input-len", "8", "--output-len", "6",
                     "--concurrency", "2", "--num-requests", "4", "--single-stream", "2",
                     "--llama-server", str(tmp_path / "absent"), "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    rows = {row["server"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["llama.cpp llama-server, F32 GGUF"] == {
        "server": "llama.cpp llama-server, F32 GGUF", "skipped": True,
        "why": "no --llama-server binary"}
    served = rows["SplitServe colocated, fp32"]
    offline = rows["SplitServe engine offline, fp32"]
    assert served["failed"] == 0 and served["output_tok_s"] > 0 and offline["output_tok_s"] > 0
    assert served["ratios"]["served/offline"] == pytest.approx(
        served["output_tok_s"] / offline["output_tok_s"])
    lone = rows["SplitServe colocated, fp32, c=1"]
    assert lone["failed"] == 0 and offline["batch1_step_ms"] > 0
    assert lone["ratios"]["TPOT/batch-1 step"] == pytest.approx(
        lone["tpot_p50_ms"] / offline["batch1_step_ms"])
    assert "skipped: no --llama-server binary" in printed
    assert f"served/offline {served['ratios']['served/offline']:.2f}x" in printed


def test_peer_bench_refuses_unknown_precisions(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main(["peer", "--precisions", "fp8"]) == 2
    assert "precisions are bf16, fp32" in capsys.readouterr().err
