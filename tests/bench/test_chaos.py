"""`splitserve bench chaos` on a tiny model: faults really happen, requests resume, the
outputs equal the fault-free pass, and no block is left behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from splitserve.bench import chaos

pytestmark = pytest.mark.chaos


def test_chaos_bench_loses_nothing(tiny_llama: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "chaos.json"
    rc = chaos.main(["--model", str(tiny_llama), "--num-requests", "32", "--concurrency", "12",
                     "--max-tokens", "300", "--faults", "kill,term,cancel", "--seed", "1",
                     "--out", str(out)])
    printed = capsys.readouterr().out
    figures = json.loads(out.read_text())
    assert rc == 0, printed
    assert sum(figures["faults"].values()) >= 1, figures  # the pass outlasted a fault
    assert figures["resumed_requests"] >= 1 and figures["cancelled_by_client"] >= 1
    assert figures["exact"] + figures["cancelled_by_client"] == 32
    assert not any(figures["leaked_blocks"].values())
    assert "PASS" in printed


def test_chaos_bench_prefill_worker_and_redis_faults(tiny_llama: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The prefill worker killed and restarted, Redis (the cluster state) killed and
    replaced by an empty one: every request still completes exactly, nothing leaks."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make setup installs it)")
    out = tmp_path / "chaos.json"
    rc = chaos.main(["--model", str(tiny_llama), "--num-requests", "24", "--concurrency", "12",
                     "--max-tokens", "400", "--faults", "pkill,redis", "--max-faults", "2",
                     "--seed", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    figures = json.loads(out.read_text())
    assert rc == 0, printed
    assert sum(figures["faults"].values()) >= 1, figures
    assert figures["exact"] == 24 and figures["failed"] == 0, figures
    assert not any(figures["leaked_blocks"].values())
