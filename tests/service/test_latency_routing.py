"""Latency-aware routing end to end (`route_policy="latency"`, issue 17): the workers
measure their step times and publish them with their load, the router routes by the TTFT
they predict, observes its prediction error, and refuses at once, before any worker call,
a request whose TTFT SLO even the best route would miss. A real router, one prefill and one
decode worker (tiny random model), real gRPC and KV transfer in this process."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitserve.client import Client, Overloaded
from tests.service.deployment import Deployment, start_deployment

ENGINE = {"num_kv_blocks": 256, "block_size": 8, "max_num_batched_tokens": 64}
GREEDY = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def deployment(tiny_llama: Path) -> Iterator[Deployment]:
    d = start_deployment(str(tiny_llama), 1, 1, engine=ENGINE,
                         router={"route_policy": "latency", "local_prefill_threshold": 24})
    yield d
    d.stop()


def _metric(d: Deployment, name: str) -> float:
    with urllib.request.urlopen(f"http://{d.router.http_address}/metrics") as response:
        text = response.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def _wait_for_step_models(d: Deployment, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        loads = [load for _, load in d.router.store.live_workers()]
        if len(loads) == 2 and all(load is not None and load.step_model for load in loads):
            return
        assert time.monotonic() < deadline, f"no step times published: {loads}"
        time.sleep(0.1)


def test_routes_by_measured_step_times_and_refuses_what_no_route_meets(
        deployment: Deployment) -> None:
    d = deployment
    with Client(d.address, timeout=60) as client:
        # Until both workers' step times are known, routing is by load: long prompts on the
        # prefill worker, short ones on the decode worker, which teaches both.
        for i in range(3):
            client.generate(list(range(100 + i, 160 + i)), **GREEDY)
            client.generate([5 + i, 6, 7], **GREEDY)
        _wait_for_step_models(d)
        before = _metric(d, "splitserve_route_ttft_prediction_abs_error_seconds_count")
        outputs = [client.generate(list(range(300 + i, 300 + 10 * i + 5)), **GREEDY)
                   for i in range(1, 6)]
        assert all(len(out.token_ids) == 8 for out in outputs)
        assert _metric(d, "splitserve_route_ttft_prediction_abs_error_seconds_count") \
            == before + 5
        refused_before = _metric(d, 'splitserve_admission_rejections_total{reason="slo_route"}')
        start = time.monotonic()
        with pytest.raises(Overloaded, match="on the best route exceeds the request's SLO "
                           "of 1 ms"):
            client.generate(list(range(1000, 1400)), max_tokens=4, ttft_slo_ms=1)
        assert time.monotonic() - start < 5.0
        assert _metric(d, 'splitserve_admission_rejections_total{reason="slo_route"}') \
            == refused_before + 1
        # A loose SLO is served.
        assert len(client.generate(list(range(1000, 1400)), max_tokens=4,
                                   ttft_slo_ms=600_000).token_ids) == 4
    state = d.wait_all_blocks_free()
    assert all(free == total for free, total in state.values()), state


def test_http_refusal_carries_retry_after(deployment: Deployment) -> None:
    _wait_for_step_models(deployment)
    body = json.dumps({"prompt": list(range(2000, 2400)), "max_tokens": 4,
                       "ttft_slo_ms": 1}).encode()
    request = urllib.request.Request(f"http://{deployment.router.http_address}/v1/completions",
                                     data=body, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 429
    assert int(caught.value.headers["Retry-After"]) >= 1
    assert "on the best route" in json.loads(caught.value.read())["error"]["message"]
