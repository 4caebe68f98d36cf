"""Closed-loop P:D control in process: the real router with --pd-control, flippable and
plain workers, real gRPC, KV over gloo. A synthetic TTFT signal (samples fed to the
router's latency window) makes prefill short; the controller skips the plain decode
worker (UNIMPLEMENTED), switches the flippable one to prefill, exports the switch, then
reports prefill still short with decode at its minimum (the scale hint). Requests before
and after are served with the same greedy tokens, the switched worker prefilling."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from splitserve.client import Client
from splitserve.cluster.store import WorkerRole
from splitserve.decode_worker.worker import DecodeWorker
from splitserve.engine.config import EngineConfig
from splitserve.kvtransfer.torch_dist import create_rendezvous_store
from splitserve.prefill_worker.worker import PrefillWorker
from splitserve.router.config import RouterConfig
from splitserve.router.pd_decide import PDControlConfig
from splitserve.router.server import RunningRouter, start_router
from splitserve.worker.flip import FlippableWorker
from splitserve.worker.runtime import WorkerOptions
from tests.service.deployment import wait_for_workers

pytestmark = pytest.mark.timeout(120)

ROLES: dict[str, Any] = {"prefill": PrefillWorker, "decode": DecodeWorker}
PROMPT = list(range(500, 540))
CONTROL = PDControlConfig(ttft_slo_ms=1000, tpot_slo_ms=500, period_s=0.1, window_s=30,
                          min_samples=5, consecutive=2, cooldown_s=1.0, drain_timeout_s=10)


@pytest.fixture
def cluster(tiny_llama: Path) -> Iterator[tuple[RunningRouter, dict[str, Any]]]:
    router = start_router(RouterConfig(
        model=str(tiny_llama), block_size=8, local_prefill_threshold=0,
        prefill_policy="round_robin", pd_control=CONTROL))
    kv_store = create_rendezvous_store("127.0.0.1", 0)
    engine = EngineConfig(model=str(tiny_llama), num_kv_blocks=64, block_size=8,
                          enable_prefix_caching=False)  # every prompt prefilled remotely

    def options(worker_id: str) -> WorkerOptions:
        return WorkerOptions(engine=engine, worker_id=worker_id, cluster_url=router.cluster_url,
                             kv_store=f"127.0.0.1:{kv_store.port}", heartbeat_ttl_s=2.0)

    workers = {"d0": DecodeWorker(options("d0")).start(),  # plain: cannot switch
               "f1": FlippableWorker(options("f1"), ROLES, "decode").start(),
               "p0": FlippableWorker(options("p0"), ROLES, "prefill").start()}
    wait_for_workers(router, 3)
    yield router, workers
    for worker in workers.values():
        worker.stop(0.2)
    router.stop(1.0)


def _generate(router: RunningRouter) -> list[int]:
    with Client(router.address, timeout=60, max_retries=0) as client:
        result = client.generate(PROMPT, max_tokens=8, temperature=0.0, ignore_eos=True)
    return list(result.token_ids)


def _until(what: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _sample(router: RunningRouter, name: str, **labels: str) -> float:
    return router.metrics.registry.get_sample_value(name, labels) or 0.0


def test_controller_switches_a_flippable_decode_worker_to_prefill(
        cluster: tuple[RunningRouter, dict[str, Any]]) -> None:
    router, workers = cluster
    controller = router.pd_controller
    assert controller is not None
    expected = _generate(router)
    _until(lambda: _sample(router, "splitserve_pd_workers", role="decode") == 2)
    assert not any(p.decision.action == "switch" for p in controller.history)

    for _ in range(20):  # every request of the last seconds missed the 1 s TTFT objective
        router.metrics.recent_ttft.add(3.0)
    _until(lambda: {i.worker_id: i.role for i, _ in router.store.live_workers()}
           == {"d0": WorkerRole.DECODE, "f1": WorkerRole.PREFILL, "p0": WorkerRole.PREFILL})
    assert workers["f1"].role == "prefill" and workers["f1"].num_switches == 1
    assert _sample(router, "splitserve_pd_role_switches_total", direction="decode_to_prefill",
                   result="done") == 1
    assert _sample(router, "splitserve_pd_role_switch_seconds_count") == 1
    switches = [p for p in controller.history if p.decision.action == "switch"]
    assert len(switches) == 1 and switches[0].signals.ttft_ms == 3000.0
    assert controller._not_flippable == {"d0"}  # asked first (same load, first id), refused

    # Prefill is still short, but decode is down to its minimum of one: the scale hint.
    _until(lambda: _sample(router, "splitserve_pd_scale_hint", role="prefill") == 1)
    assert controller.history[-1].decision.action == "blocked"
    assert _sample(router, "splitserve_pd_workers", role="prefill") == 2

    sent_before = workers["f1"].core.kv.stats().bytes_sent
    assert [_generate(router) for _ in range(2)] == [expected, expected]  # round robin: f1 too
    assert workers["f1"].core.kv.stats().bytes_sent > sent_before
