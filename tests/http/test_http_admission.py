"""/health and the HTTP statuses of admission: 503 without a decode worker, 200 with one,
429 over capacity. A router with no worker, then one decode worker (in-process KV backend:
with no prefill worker every prompt is prefilled on the decode worker)."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from splitserve.decode_worker.worker import DecodeWorker
from splitserve.engine.config import EngineConfig
from splitserve.router.config import RouterConfig
from splitserve.router.server import RunningRouter, start_router
from splitserve.worker.runtime import WorkerOptions

ENGINE = {"num_kv_blocks": 64, "block_size": 8, "max_num_batched_tokens": 128}


@pytest.fixture(scope="module")
def router(tiny_llama: Path) -> Iterator[RunningRouter]:
    config = RouterConfig(model=str(tiny_llama), block_size=8, http_port=0, max_inflight=1,
                          max_queued=0, worker_refresh_s=0.05)
    with start_router(config) as running:
        yield running


@pytest.fixture
def decode_worker(router: RunningRouter, tiny_llama: Path) -> Iterator[DecodeWorker]:
    options = WorkerOptions(engine=EngineConfig(model=str(tiny_llama), **ENGINE),
                            worker_id="decode-http", cluster_url=router.cluster_url,
                            kv_backend="inproc", heartbeat_ttl_s=2.0)
    worker = DecodeWorker(options).start()
    yield worker
    worker.stop(0.5)


def health(router: RunningRouter) -> tuple[int, dict[str, object]]:
    host, port = router.http_address.split(":")  # type: ignore[union-attr]
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def wait_health(router: RunningRouter, status: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while health(router)[0] != status:
        assert time.monotonic() < deadline, f"/health never answered {status}"
        time.sleep(0.05)


def client(router: RunningRouter) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{router.http_address}/v1", api_key="none",
                         max_retries=0, timeout=30)


def test_health_and_503_follow_the_decode_workers(router: RunningRouter,
                                                  tiny_llama: Path) -> None:
    assert health(router) == (503, {"status": "unavailable", "decode_workers": 0,
                                    "prefill_workers": 0, "draining": False,
                                    "cluster_state": {"reachable": True}})
    with client(router) as c:
        with pytest.raises(openai.APIStatusError) as info:
            c.completions.create(model=router.model.model_id, prompt="Hi", max_tokens=2)
        assert info.value.status_code == 503
        assert "no live decode worker" in info.value.message
        options = WorkerOptions(engine=EngineConfig(model=str(tiny_llama), **ENGINE),
                                cluster_url=router.cluster_url, kv_backend="inproc")
        worker = DecodeWorker(options).start()
        try:
            wait_health(router, 200)
            assert health(router)[1]["decode_workers"] == 1
            out = c.completions.create(model=router.model.model_id, prompt="Hi", max_tokens=3,
                                       temperature=0.0, extra_body={"ignore_eos": True})
            assert out.usage is not None and out.usage.completion_tokens == 3
        finally:
            worker.stop(0.5)  # deregisters at once
        wait_health(router, 503)


def test_over_capacity_is_429(router: RunningRouter, decode_worker: DecodeWorker) -> None:
    wait_health(router, 200)
    registry = router.metrics.registry
    rejected = registry.get_sample_value("splitserve_admission_rejections_total",
                                         {"reason": "over_capacity"})
    with client(router) as c:
        stream = c.completions.create(model=router.model.model_id, prompt="Hold the slot",
                                      max_tokens=1500, temperature=0.0, stream=True,
                                      extra_body={"ignore_eos": True})
        next(iter(stream))  # the one admission slot is taken now
        with pytest.raises(openai.RateLimitError) as info:
            c.completions.create(model=router.model.model_id, prompt="Hi", max_tokens=2)
        assert info.value.status_code == 429
        assert isinstance(info.value.body, dict) and info.value.body["code"] == "over_capacity"
        assert info.value.response.headers["Retry-After"] == "1"
        # Refused before the body is read: even one that is not JSON gets the 429.
        host, port = router.http_address.split(":")  # type: ignore[union-attr]
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("POST", "/v1/completions", body=b"{not json",
                     headers={"Content-Type": "application/json"})
        assert conn.getresponse().status == 429
        conn.close()
        stream.close()
    assert registry.get_sample_value("splitserve_admission_rejections_total",
                                     {"reason": "over_capacity"}) == (rejected or 0) + 2
    deadline = time.monotonic() + 10
    while decode_worker.loop.call(lambda e: e.block_manager.num_free_blocks) < 64:
        assert time.monotonic() < deadline, "the closed stream's blocks were not freed"
        time.sleep(0.05)
