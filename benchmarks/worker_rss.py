"""A router's and a decode worker's resident memory once started (VmRSS, 1 s after READY).

    PYTHONPATH=. .venv/bin/python benchmarks/worker_rss.py MODEL_DIR
"""

from __future__ import annotations

import sys
import time

from splitserve.bench.procs import spawn


def rss_mb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS")).split()[1]) // 1024


def main() -> None:
    model = sys.argv[1]
    router, fields = spawn(["router", "--model", model, "--port", "0", "--http-port", "0"])
    decode, _ = spawn(["decode", "--model", model, "--cluster", fields[4],
                       "--num-kv-blocks", "64"])
    time.sleep(1)
    print(f"decode worker RSS {rss_mb(decode.pid)} MB, router {rss_mb(router.pid)} MB")
    for proc in (decode, router):
        proc.terminate()
    for proc in (decode, router):
        proc.wait()


if __name__ == "__main__":
    main()
