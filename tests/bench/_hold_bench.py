"""A stand-in benchmark for test_bench_sigterm: starts a child process, as the real ones
start deployments, and stops it on the way out; prints the child's pid, then waits."""

from __future__ import annotations

import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        print(f"READY {child.pid}", flush=True)
        time.sleep(600)
    finally:
        child.terminate()
        child.wait(10)
    return 0
