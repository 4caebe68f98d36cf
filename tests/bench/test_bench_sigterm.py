"""SIGTERM stops a benchmark like Ctrl-C: its `finally` blocks run, so the processes it
started (deployments, servers) stop with it instead of running on as orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = """
import sys
from splitserve import bench
bench.BENCHMARKS["hold"] = ("tests.bench._hold_bench", "a stand-in")
sys.exit(bench.main(["hold"]))
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.timeout(60)
def test_sigterm_runs_the_benchmarks_cleanup() -> None:
    bench = subprocess.Popen([sys.executable, "-c", SCRIPT], cwd=REPO, stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert bench.stdout is not None
    line = bench.stdout.readline()
    assert line.startswith("READY"), line
    child = int(line.split()[1])
    assert _alive(child)
    bench.send_signal(signal.SIGTERM)
    assert bench.wait(30) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 10
    while _alive(child):  # terminated and reaped by the benchmark's finally
        assert time.monotonic() < deadline, "the benchmark's child outlived it"
        time.sleep(0.05)
