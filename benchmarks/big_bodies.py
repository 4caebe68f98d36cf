"""Ten 10 MB HTTP bodies at once against a router (issue 13's "limits before work"): how fast
each is refused, whether a normal request is still served meanwhile, and the router's RSS.

    PYTHONPATH=. .venv/bin/python benchmarks/big_bodies.py [--bodies 10] [--mb 10]

Starts a router with one decode worker on a tiny random-weight model in this process (the
router's RSS is this process's), all on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from splitserve.bench.fuzz_service import rss_bytes
from splitserve.engine.tiny_model import write_tiny_model
from tests.service.deployment import start_deployment


def _rss_mb() -> float:
    return rss_bytes(os.getpid()) / (1 << 20)


def _post(address: str, body: bytes) -> tuple[int, float]:
    host, port = address.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    started = time.monotonic()
    try:
        conn.request("POST", "/v1/completions", body=body,
                     headers={"Content-Type": "application/json"})
        status = conn.getresponse().status
    except (BrokenPipeError, ConnectionResetError):
        status = -1  # the server answered and closed before the whole body was sent
    finally:
        conn.close()
    return status, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bodies", type=int, default=10)
    parser.add_argument("--mb", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_model(Path(tmp) / "tiny")
        d = start_deployment(str(model), 0, 1, router={"http_port": 0},
                             engine={"num_kv_blocks": 64, "block_size": 8})
        try:
            address = d.router.http_address
            assert address is not None
            small = json.dumps({"prompt": "Hello", "max_tokens": 4}).encode()
            _post(address, small)  # warm
            before = _rss_mb()
            big = json.dumps({"prompt": "x" * (args.mb * 1024 * 1024), "max_tokens": 4}).encode()
            with concurrent.futures.ThreadPoolExecutor(args.bodies + 1) as pool:
                bigs = [pool.submit(_post, address, big) for _ in range(args.bodies)]
                normal = pool.submit(_post, address, small)
                results = [f.result() for f in bigs]
                normal_status, normal_s = normal.result()
            after = _rss_mb()
            times = sorted(t for _, t in results)
            print(f"{args.bodies} bodies of {len(big) / 2**20:.1f} MiB at once: statuses "
                  f"{sorted({s for s, _ in results})}; refused in median "
                  f"{statistics.median(times) * 1000:.1f} ms, max {times[-1] * 1000:.1f} ms")
            print(f"normal request meanwhile: HTTP {normal_status} in {normal_s * 1000:.0f} ms")
            print(f"router process RSS: {before:.0f} MiB before, {after:.0f} MiB after "
                  f"({after - before:+.0f} MiB); live workers: "
                  f"{len(d.router.store.live_workers())}")
        finally:
            d.stop()


if __name__ == "__main__":
    main()
