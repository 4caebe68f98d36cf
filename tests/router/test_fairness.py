"""Who gets a freed admission slot: priority classes with aging, then fair share across
clients by virtual token counters (VTC), then arrival order."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest

from splitserve.router.admission import AdmissionController
from splitserve.router.fairness import (
    FairShare,
    FairShareConfig,
    Waiter,
    parse_client_weights,
)
from tests.router.test_admission import settle


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 10))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_least_served_client_goes_first_then_the_oldest() -> None:
    fair = FairShare()
    fair.charge("flood", prompt_tokens=100, output_tokens=50)  # 100 + 2 * 50
    fair.charge("light", prompt_tokens=10)
    waiting = [Waiter("flood", 0, 0.0, 0), Waiter("flood", 0, 0.0, 1),
               Waiter("light", 0, 0.0, 2), Waiter("light", 0, 0.0, 3)]
    assert fair.counter("flood") == 200 and fair.counter("light") == 10
    assert fair.pick(waiting) is waiting[2]
    assert FairShare(FairShareConfig(policy="fcfs")).pick(waiting) is waiting[0]


def test_weights_scale_the_service_a_client_is_charged() -> None:
    fair = FairShare(FairShareConfig(client_weights={"gold": 4.0}, output_weight=1.0))
    fair.charge("gold", prompt_tokens=40, output_tokens=40)
    fair.charge("plain", prompt_tokens=40, output_tokens=40)
    assert fair.counter("gold") == 20 and fair.counter("plain") == 80


def test_an_idle_client_banks_no_credit() -> None:
    fair = FairShare()
    fair.charge("a", prompt_tokens=1000)
    fair.charge("b", prompt_tokens=400)
    fair.joined("newcomer", [Waiter("a", 0, 0, 0), Waiter("b", 0, 0, 1)])
    assert fair.counter("newcomer") == 400  # the least counter of those waiting
    fair.charge("rich", prompt_tokens=5000)
    fair.joined("rich", [Waiter("a", 0, 0, 0)])
    assert fair.counter("rich") == 5000  # never lowered
    # An empty queue: the counter of the client last served is the floor.
    assert fair.pick([Waiter("a", 0, 0, 0)]) is not None
    fair.joined("late", [])
    assert fair.counter("late") == 1000


def test_a_better_class_goes_first_and_waiting_improves_a_class() -> None:
    clock = Clock()
    fair = FairShare(FairShareConfig(aging_s=10.0), clock=clock)
    fair.charge("vip", prompt_tokens=10_000)  # much served: classes come before fair share
    low = Waiter("bulk", 1, 0.0, 0)
    high = Waiter("vip", 0, 0.0, 1)
    assert fair.pick([low, high]) is high
    clock.now = 25.0
    newer_high = Waiter("vip", 0, 24.0, 2)
    assert fair.pick([low, newer_high]) is low  # 25 s of waiting: class 1 became -1
    assert FairShare(FairShareConfig(aging_s=0.0), clock=clock).pick([low, newer_high]) \
        is newer_high


def test_configuration_is_checked() -> None:
    assert parse_client_weights(" alice=2, bob=0.5 ,") == {"alice": 2.0, "bob": 0.5}
    for text, words in (("alice", "name=weight"), ("alice=x", "not a number")):
        with pytest.raises(ValueError, match=words):
            parse_client_weights(text)
    for kwargs, words in (({"policy": "lottery"}, "admission policy"),
                          ({"client_weights": {"a": 0.0}}, "weight of client 'a'"),
                          ({"output_weight": float("nan")}, "output_weight"),
                          ({"aging_s": -1.0}, "aging_s")):
        with pytest.raises(ValueError, match=words):
            FairShareConfig(**kwargs)  # type: ignore[arg-type]


def _served_under_contention(policy: str) -> dict[str, int]:
    """A 1-slot router: `flood` keeps 10 requests queued, `light` 2 (both backlogged: a
    request's successor queues before it leaves); each request has 20 prompt tokens and 10
    output tokens. Tokens served to each client by the time 60 requests were served."""
    served = {"flood": 0, "light": 0}

    async def body() -> None:
        adm = AdmissionController(1, 64, FairShare(FairShareConfig(policy=policy)))
        finished = asyncio.Event()
        tasks: set[asyncio.Task[None]] = set()

        def start(client: str) -> None:
            task = asyncio.create_task(request(client))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        async def request(client: str) -> None:
            await adm.acquire(client, 0, prompt_tokens=20)
            if not finished.is_set():
                start(client)  # the successor queues while this one is served
            await settle()
            adm.charge(client, 10)
            served[client] += 30
            if sum(served.values()) >= 60 * 30:
                finished.set()
            adm.release()

        for client, backlog in (("flood", 10), ("light", 2)):
            for _ in range(backlog):
                start(client)
        await finished.wait()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    run(body())
    return served


def test_fair_share_holds_when_one_client_floods_and_fcfs_does_not() -> None:
    vtc = _served_under_contention("vtc")
    fcfs = _served_under_contention("fcfs")
    assert abs(vtc["flood"] - vtc["light"]) <= 2 * 30, vtc  # within a request or two
    assert fcfs["flood"] >= 5 * fcfs["light"], fcfs  # FCFS: the flood takes nearly all


def test_a_queued_request_cancelled_leaves_the_queue() -> None:
    async def body() -> None:
        adm = AdmissionController(1, 4)
        await adm.acquire("a")
        waiting = asyncio.create_task(adm.acquire("b", 0, 5))
        await settle()
        assert adm.num_queued == 1
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        assert adm.num_queued == 0
        adm.release()
        assert adm.num_inflight == 0
        assert adm.fair.counter("b") == 0  # never admitted, never charged

    run(body())


def test_aging_stops_at_the_best_class_waiting_where_fair_share_decides() -> None:
    """Old requests of one class do not overtake a less-served client's newer ones: in the
    first measurement, a flood's 10 s old waiters aged past the light client's fresh ones."""
    clock = Clock()
    fair = FairShare(FairShareConfig(aging_s=1.0), clock=clock)
    fair.charge("flood", prompt_tokens=500)
    old_flood = Waiter("flood", 0, 0.0, 0)
    clock.now = 30.0
    fresh_light = Waiter("light", 0, 30.0, 1)
    assert fair.pick([old_flood, fresh_light]) is fresh_light


def test_routers_share_their_counters_through_the_cluster_store() -> None:
    """Two routers of one deployment: what one served counts on the other after a sync, so
    a client cannot gain by spreading its requests over routers."""
    from splitserve.cluster.memory import InMemoryClusterStore

    store = InMemoryClusterStore()
    a, b = FairShare(), FairShare()
    a.charge("flood", prompt_tokens=1000)
    b.charge("light", prompt_tokens=10)
    for router in (a, b, a):
        router.merge(store.add_service(router.take_pending()))
    assert a.counters == b.counters == {"flood": 1000.0, "light": 10.0}
    assert b.pick([Waiter("flood", 0, 0, 0), Waiter("light", 0, 0, 1)]).client == "light"
    # Charged between taking the pending service and merging the totals: kept on top.
    pending = a.take_pending()
    a.charge("flood", prompt_tokens=5)
    a.merge(store.add_service(pending))
    assert a.counter("flood") == 1005.0
    # A failed sync puts what it took back, to be sent next time.
    a.merge({}, unsent=a.take_pending())
    a.merge(store.add_service(a.take_pending()))
    assert store.add_service({})["flood"] == 1005.0
    # A lift for a joining client is service too: every router sees it.
    b.joined("newcomer", [Waiter("flood", 0, 0, 0)])
    b.merge(store.add_service(b.take_pending()))
    assert store.add_service({})["newcomer"] == 1000.0
