"""Redis down: the router keeps routing on its last view of the workers for
cluster_stale_s ("degraded" health, in JSON), then answers UNAVAILABLE; once Redis is back
it serves again without a restart of anything."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

from splitserve.client import Client, SplitServeError
from splitserve.decode_worker.worker import DecodeWorker
from splitserve.engine.config import EngineConfig
from splitserve.router.config import RouterConfig
from splitserve.router.server import RunningRouter, start_router
from splitserve.worker.runtime import WorkerOptions
from tests.conftest import _free_port, start_redis_server

STALE_S = 4.0
GREEDY = {"max_tokens": 4, "temperature": 0.0, "ignore_eos": True}

pytestmark = pytest.mark.chaos


def _health(router: RunningRouter) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://{router.http_address}/health", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _until(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_router_rides_out_a_redis_outage(tiny_llama: Path, tmp_path: Path) -> None:
    port = _free_port()
    url = f"redis://127.0.0.1:{port}/0"
    redis_proc = start_redis_server(port, tmp_path)
    router = start_router(RouterConfig(model=str(tiny_llama), block_size=8, cluster_url=url,
                                       worker_refresh_s=0.1, cluster_stale_s=STALE_S))
    worker = DecodeWorker(WorkerOptions(
        engine=EngineConfig(model=str(tiny_llama), num_kv_blocks=64, block_size=8),
        cluster_url=url, kv_backend="inproc", heartbeat_ttl_s=2.0)).start()
    try:
        _until(lambda: _health(router)[0] == 200, 30, "the worker did not register")
        with Client(router.address, timeout=30, max_retries=0) as client:
            expected = client.generate([5, 6, 7], **GREEDY).token_ids
            redis_proc.terminate()
            redis_proc.wait(10)
            down_at = time.monotonic()
            # Served from the last view while it is younger than cluster_stale_s.
            for _ in range(3):
                assert client.generate([5, 6, 7], **GREEDY).token_ids == expected
            _until(lambda: _health(router)[1]["status"] == "degraded", 2, "not degraded")
            status, body = _health(router)
            assert status == 200 and body["cluster_state"]["reachable"] is False
            assert "ConnectionError" in body["cluster_state"]["error"]
            assert time.monotonic() - down_at < STALE_S, "the test machine is too slow"
            # Past cluster_stale_s: UNAVAILABLE with the reason, health 503 in JSON.
            time.sleep(max(0.0, STALE_S + 0.5 - (time.monotonic() - down_at)))
            with pytest.raises(SplitServeError) as info:
                client.generate([5, 6, 7], **GREEDY)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
            assert "cluster state unreachable" in str(info.value)
            status, body = _health(router)
            assert (status, body["status"]) == (503, "unavailable")
            # Redis back (empty: no persistence): workers re-register, serving resumes.
            redis_proc = start_redis_server(port, tmp_path)
            _until(lambda: _health(router)[1]["status"] == "ok", 15, "did not recover")
            assert client.generate([5, 6, 7], **GREEDY).token_ids == expected
    finally:
        worker.stop(0.5)
        router.stop(1.0)
        redis_proc.terminate()
        redis_proc.wait(10)
