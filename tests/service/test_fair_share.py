"""Fair share and priorities through the router (issue 17): with one admission slot, a
client flooding the queue does not crowd out a lighter one (VTC), and a better priority
class jumps the queue. A real router with API keys and one decode worker (tiny random
model) in this process; clients over gRPC."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from splitserve.client import Client
from splitserve.router.fairness import FairShareConfig
from tests.service.deployment import Deployment, start_deployment

ENGINE = {"num_kv_blocks": 64, "block_size": 8, "max_num_batched_tokens": 128}
KEYS = {"flood": "flood-key-0123456789abcdef", "light": "light-key-0123456789abcdef"}
GREEDY = {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True}


def deploy(tiny_llama: Path, tmp: Path, policy: str) -> Deployment:
    keys = tmp / f"keys-{policy}"
    keys.write_text("".join(f"{name}:{key}\n" for name, key in KEYS.items()))
    return start_deployment(str(tiny_llama), 0, 1, engine=ENGINE, router={
        "api_keys_file": str(keys), "max_inflight": 1, "max_queued": 64,
        "fair_share": FairShareConfig(policy=policy)})


def served_while_both_backlogged(d: Deployment, seconds: float) -> dict[str, int]:
    """Requests completed per client while `flood` keeps 8 in flight and `light` 2."""
    stop = threading.Event()
    done = {"flood": 0, "light": 0}
    lock = threading.Lock()

    def loop(name: str) -> None:
        with Client(d.address, token=KEYS[name], timeout=60) as client:
            while not stop.is_set():
                client.generate([5, 6, 7, 8], **GREEDY)
                if not stop.is_set():
                    with lock:
                        done[name] += 1

    with ThreadPoolExecutor(10) as pool:
        futures = [pool.submit(loop, "flood") for _ in range(8)]
        futures += [pool.submit(loop, "light") for _ in range(2)]
        time.sleep(seconds)
        stop.set()
        for future in futures:
            future.result()
    return done


@pytest.fixture(scope="module")
def deployments(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[dict[str, Deployment]]:
    tmp = tmp_path_factory.mktemp("fair")
    made = {policy: deploy(tiny_llama, tmp, policy) for policy in ("vtc", "fcfs")}
    yield made
    for d in made.values():
        d.stop()


def test_a_flooding_client_does_not_crowd_out_a_light_one(
        deployments: dict[str, Deployment]) -> None:
    fair = served_while_both_backlogged(deployments["vtc"], 4.0)
    fcfs = served_while_both_backlogged(deployments["fcfs"], 4.0)
    assert fair["light"] >= 8 and fcfs["light"] >= 1, (fair, fcfs)
    # Same prompt and output lengths: equal service means equal request counts.
    assert max(fair.values()) <= 1.25 * min(fair.values()) + 1, fair
    assert fcfs["flood"] >= 2.5 * fcfs["light"], fcfs  # FCFS follows the queue's 8:2 mix


def test_a_better_priority_class_jumps_the_queue(deployments: dict[str, Deployment]) -> None:
    d = deployments["vtc"]
    finished: dict[str, float] = {}

    def one(name: str, priority: int) -> None:
        with Client(d.address, token=KEYS["flood"], timeout=60) as client:
            client.generate([9, 10, 11], max_tokens=96, temperature=0.0, ignore_eos=True,
                            priority=priority)
        finished[name] = time.monotonic()

    with ThreadPoolExecutor(9) as pool:
        bulk = [pool.submit(one, f"bulk-{i}", 5) for i in range(8)]
        time.sleep(0.3)  # the bulk requests are queued behind the one slot
        vip = pool.submit(one, "vip", 0)
        for future in [*bulk, vip]:
            future.result()
    later = [name for name, at in finished.items() if at > finished["vip"]]
    assert len(later) >= 5, sorted(finished.items(), key=lambda kv: kv[1])


def test_a_request_that_would_miss_its_ttft_slo_is_refused_at_once(
        deployments: dict[str, Deployment]) -> None:
    """With the one slot busy and requests queued, a request whose TTFT SLO the measured
    service times cannot meet gets 429 with a Retry-After at once; one with a loose SLO is
    served (issue 17's SLO-aware admission)."""
    import json

    from tests.http._raw import call

    d = deployments["vtc"]
    auth = {"Authorization": f"Bearer {KEYS['light']}"}
    body = {"prompt": [9, 10, 11], "max_tokens": 64, "ignore_eos": True}
    with ThreadPoolExecutor(5) as pool:
        # Measured times first (one request), then a queue behind the one slot.
        assert call(d, "POST", "/v1/completions", json.dumps(body).encode(), auth)[0] == 200
        long = {**body, "max_tokens": 256}  # a refusal that queued would wait seconds
        busy = [pool.submit(call, d, "POST", "/v1/completions", json.dumps(long).encode(),
                            auth) for _ in range(4)]
        time.sleep(0.2)
        status, error, headers, elapsed = call(
            d, "POST", "/v1/completions",
            json.dumps({**body, "max_tokens": 2, "ttft_slo_ms": 1}).encode(), auth)
        assert status == 429, error
        assert "SLO of 1 ms" in error["error"]["message"] and int(headers["Retry-After"]) >= 1
        assert elapsed < 0.5
        status, _, _, _ = call(d, "POST", "/v1/completions",
                               json.dumps({**body, "ttft_slo_ms": 600_000}).encode(), auth)
        assert status == 200
        assert all(f.result()[0] == 200 for f in busy)


def test_the_decode_workers_scheduler_runs_a_better_class_first(tiny_llama: Path) -> None:
    """No router queue (many slots): requests queue in the decode worker's engine (one
    sequence at a time), and a better class overtakes the queued worse ones there, by
    preempting the running one if need be."""
    d = start_deployment(str(tiny_llama), 0, 1, engine={**ENGINE, "max_num_seqs": 1},
                         router={"max_inflight": 64})
    finished: dict[str, float] = {}

    def one(name: str, priority: int) -> None:
        with Client(d.address, timeout=60) as client:
            client.generate([9, 10, 11], max_tokens=48, temperature=0.0, ignore_eos=True,
                            priority=priority)
        finished[name] = time.monotonic()

    try:
        with ThreadPoolExecutor(9) as pool:
            bulk = [pool.submit(one, f"bulk-{i}", 5) for i in range(8)]
            time.sleep(0.3)
            vip = pool.submit(one, "vip", 0)
            for future in [*bulk, vip]:
                future.result()
    finally:
        d.stop()
    later = [name for name, at in finished.items() if at > finished["vip"]]
    assert len(later) >= 5, sorted(finished.items(), key=lambda kv: kv[1])
