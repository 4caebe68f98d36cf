"""The router's indexed decision path (WorkerDirectory's index, the policies' pick_from,
best_routes_from, the prefix overlap looked up only for the workers a decision reads) picks
exactly what the reference does: views built from the store's live workers plus pending
assignments, every worker's overlap, then rank_decode_workers / plan_route / best_routes
over lists. Random states of up to 1,000 workers with many ties (small load
ranges), workers of all roles coming, going, changing load and being ejected, assignments
made and released between store reads, requests excluding workers; and the freshness
rule: a worker gone from the store is never picked once the view has refreshed. Every test
runs with the latency table's scan in C and again with its numpy expression.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Coroutine
from typing import Any

import pytest

from splitserve.cluster import InMemoryClusterStore
from splitserve.cluster.store import WorkerInfo, WorkerLoadReport, WorkerRole
from splitserve.common.step_time import StepTimeModel
from splitserve.router import latency
from splitserve.router.cluster_io import AsyncStore
from splitserve.router.latency import best_routes, best_routes_from
from splitserve.router.policy import (
    RoutingRules,
    WorkerView,
    make_prefill_policy,
    plan_route,
    plan_route_from,
    rank_decode_workers,
)
from splitserve.router.worker_index import Assignment, build_view
from splitserve.router.workers import WorkerDirectory

MODEL, BS = "m", 16
POLICIES = ("kv_aware", "least_loaded", "round_robin")


@pytest.fixture(autouse=True, params=("c", "numpy"))
def table_scan(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The latency table's scan in C (router/_route_table.c), then numpy."""
    if request.param == "c":
        assert latency._route_table is not None, "setup.py did not build _route_table"
    else:
        monkeypatch.setattr(latency, "_route_table", None)


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 120))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _step_model(rng: random.Random, unknown_share: float) -> StepTimeModel | None:
    if rng.random() < unknown_share:
        return None
    return StepTimeModel(base_ms=rng.choice((0.0, 2.0, 2.5)), per_seq_ms=rng.choice((0.5, 1.0)),
                         per_prompt_token_ms=rng.choice((0.01, 0.1, 1 / 3)),
                         token_budget=rng.choice((0, 64, 100, 512)))


def _load(rng: random.Random, with_models: bool, unknown_share: float = 0.02
          ) -> WorkerLoadReport:
    return WorkerLoadReport(num_waiting=rng.randrange(3), num_running=rng.randrange(4),
                            num_free_blocks=rng.randrange(40),
                            num_queued_tokens=rng.randrange(6) * 128,  # to 2 ranks and a half
                            updated_at=time.time() + rng.uniform(-1, 1),
                            step_model=_step_model(rng, unknown_share) if with_models else None)


ALL_ROLES = (WorkerRole.PREFILL, WorkerRole.DECODE, WorkerRole.BOTH)


def _register(store: InMemoryClusterStore, rng: random.Random, i: int,
              roles: tuple[WorkerRole, ...] = ALL_ROLES) -> None:
    role = rng.choice(roles)
    model = MODEL if rng.random() > 0.03 else "other"
    store.register_worker(WorkerInfo(f"w{i:04d}", role, f"10.0.0.{i % 300}:{i // 300}", model,
                                     BS, 40), ttl_s=60)


def _reference(store: InMemoryClusterStore, pending: dict[str, list[Assignment]],
               ejected: set[str]) -> tuple[list[WorkerView], list[WorkerView]]:
    """The old WorkerDirectory.snapshot(): views rebuilt from the last read."""
    decode, prefill = [], []
    for info, load in store.live_workers():
        if info.model != MODEL:
            continue
        view = build_view(info, load, pending.get(info.worker_id, []))
        if info.role.can_serve(WorkerRole.DECODE):
            decode.append(view)
        if info.role.can_serve(WorkerRole.PREFILL):
            prefill.append(view)
    prefill = [w for w in prefill if w.address not in ejected]
    decode = [w for w in decode if w.address not in ejected] or decode
    return decode, prefill


def _overlap(rng: random.Random, ids: list[str]) -> dict[str, float]:
    chosen = rng.sample(ids, k=min(len(ids), rng.randrange(12)))
    return {wid: rng.choice((0.0, 0.5, 1.0, 2.75, 4.0, 40.0)) for wid in chosen}


async def _compare(seed: int, num_workers: int, rounds: int, with_models: bool,
                   roles: tuple[WorkerRole, ...] = ALL_ROLES, unknown_share: float = 0.02,
                   max_routed: int = 1000) -> None:
    """`unknown_share`: of the load reports, those without step times (0: every worker
    reports them, a registration too, so the latency policy never falls back).
    `max_routed`: of the ranked decode workers, the most a request routes for (the
    reference prices every prefill worker for each of them)."""
    rng = random.Random(seed)
    clock = FakeClock()
    store = InMemoryClusterStore(clock=clock)
    for i in range(num_workers):
        _register(store, rng, i, roles)
        store.heartbeat(f"w{i:04d}", _load(rng, with_models, unknown_share), ttl_s=60)
    directory = WorkerDirectory(AsyncStore(store), MODEL, BS, refresh_s=3600.0)
    held: list[Assignment] = []
    fast = {name: make_prefill_policy(name) for name in POLICIES}
    slow = {name: make_prefill_policy(name) for name in POLICIES}
    next_id = num_workers
    for _ in range(rounds):
        for _ in range(rng.randrange(num_workers // 4 + 2)):  # the store changes
            wid = f"w{rng.randrange(next_id):04d}"
            action = rng.random()
            if action < 0.7:
                store.heartbeat(wid, _load(rng, with_models, unknown_share), ttl_s=60)
            elif action < 0.8:
                store.deregister_worker(wid)
            else:
                if action < 0.9:
                    wid = f"w{next_id:04d}"
                    next_id += 1
                _register(store, rng, int(wid[1:]), roles)  # new, or again (maybe another role)
                if not unknown_share:
                    store.heartbeat(wid, _load(rng, with_models, 0.0), ttl_s=60)
        snapshot = await directory.snapshot(force=True)
        ids = [info.worker_id for info, _ in store.live_workers()]
        for _ in range(rng.randrange(6)):  # work sent, answered for, finished between reads
            if held and rng.random() < 0.2:  # counted from now on (its start moves later)
                directory.delivered(rng.choice(held))
            elif held and rng.random() < 0.4:
                directory.release(held.pop(rng.randrange(len(held))))
            elif ids:
                held.append(directory.assign(rng.choice(ids), running=rng.randrange(2),
                                             blocks=rng.randrange(20),
                                             queued_tokens=rng.randrange(3) * 128))
        if ids and rng.random() < 0.3:
            victim = rng.choice(snapshot.decode + snapshot.prefill)
            directory.eject(victim, "test")
        snapshot = await directory.snapshot()
        decode, prefill = _reference(store, directory._pending, directory.ejected())
        assert snapshot.decode == decode and snapshot.prefill == prefill
        for _ in range(8):
            await _compare_request(rng, snapshot, decode, prefill, ids, fast, slow,
                                   max_routed)
    await directory.close()


async def _compare_request(rng: random.Random, snapshot: Any, decode: list[WorkerView],
                           prefill: list[WorkerView], ids: list[str],
                           fast: dict[str, Any], slow: dict[str, Any],
                           max_routed: int = 1000) -> None:
    addresses = sorted({w.address for w in decode + prefill})
    exclude = set(rng.sample(addresses, k=min(len(addresses), rng.randrange(4))))
    snap = snapshot.without(exclude)
    ref_decode = [w for w in decode if w.address not in exclude]
    ref_prefill = [w for w in prefill if w.address not in exclude]
    assert snap.has_decode() == bool(ref_decode)
    num_blocks, limit = rng.randrange(45), rng.choice((1, 3, 8, 1000))
    ranked = snap.rank_decode(num_blocks, limit)
    assert ranked == rank_decode_workers(ref_decode, num_blocks)[:limit]
    ranked = ranked[:max_routed]
    overlap = _overlap(rng, ids)
    prompt_len = rng.choice((1, 20, 64, 100, 513))
    rules = RoutingRules(block_size=BS, local_prefill_threshold=rng.choice((0, 32)))
    def scoped(prefill: bool) -> dict[str, float]:  # the overlap the router looks up
        scope = snap.overlap_scope(ranked, prefill)
        return {wid: blocks for wid, blocks in overlap.items() if wid in scope}

    for decode_view in ranked:
        local = rng.random() < 0.1
        for name in POLICIES:
            candidates = None if local else snap.prefill_candidates(decode_view.worker_id)
            got = plan_route_from(decode_view, candidates, prompt_len,
                                  scoped(fast[name].reads_prefill_overlap), rules, fast[name])
            want = plan_route(decode_view, [] if local else ref_prefill, prompt_len, overlap,
                              rules, slow[name])
            assert got == want, name
    for local_only in (False, True):
        got_routes = best_routes_from(ranked, snap.prefill_candidates(), prompt_len,
                                      scoped(True), BS, local_only)
        assert got_routes == best_routes(ranked, ref_prefill, prompt_len, overlap, BS, local_only)


@pytest.mark.parametrize("seed", range(12))
def test_small_clusters_pick_as_the_reference(seed: int) -> None:
    run(_compare(seed, num_workers=random.Random(seed).randrange(1, 40), rounds=25,
                 with_models=seed % 3 != 0))


@pytest.mark.parametrize("seed", range(3))
def test_decode_only_clusters_pick_as_the_reference(seed: int) -> None:
    """No prefill worker at all (colocated replicas): the latency policy's prefill table is
    empty (it once failed to build one: 'cannot reshape array of size 0')."""
    run(_compare(seed, num_workers=random.Random(seed).randrange(1, 6), rounds=10,
                 with_models=True, roles=(WorkerRole.DECODE,)))


@pytest.mark.parametrize(("with_models", "unknown_share"),
                         [(True, 0.02), (False, 0.02), (True, 0.0)])
def test_a_thousand_workers_pick_as_the_reference(with_models: bool,
                                                  unknown_share: float) -> None:
    """With 2% of the reports lacking step times, some candidate almost always lacks them
    and the latency policy falls back to the load route; with none lacking them, every
    latency decision goes through the numpy table over the prefill workers. Routes are
    compared for the first 8 ranked decode workers at most (the router tries 3 by default;
    the reference prices ~400 prefill workers for each), the ranking itself in full."""
    run(_compare(7, num_workers=1000, rounds=6, with_models=with_models,
                 unknown_share=unknown_share, max_routed=8))


async def _latency_decisions_under_changing_work(seed: int) -> None:
    """Latency decisions for prompts of one length, each followed by work sent to the
    prefill worker it picked (or finished), each compared with the reference's."""
    rng = random.Random(seed)
    store = InMemoryClusterStore(clock=FakeClock())
    for i in range(40):
        role = WorkerRole.PREFILL if i < 24 else rng.choice((WorkerRole.DECODE, WorkerRole.BOTH))
        store.register_worker(WorkerInfo(f"w{i:04d}", role, f"10.0.0.{i}:1", MODEL, BS, 40),
                              ttl_s=60)
        model = StepTimeModel(base_ms=rng.choice((2.0, 2.5)), per_seq_ms=0.5,
                              per_prompt_token_ms=rng.choice((0.01, 0.1)),
                              token_budget=rng.choice((64, 512)))
        store.heartbeat(f"w{i:04d}", WorkerLoadReport(
            num_running=rng.randrange(4), num_free_blocks=40, step_model=model,
            num_queued_tokens=rng.randrange(4) * 128), ttl_s=60)
    directory = WorkerDirectory(AsyncStore(store), MODEL, BS, refresh_s=3600.0)
    snapshot = await directory.snapshot(force=True)
    held: list[Assignment] = []
    changed = 0
    for _ in range(60):
        decode, prefill = _reference(store, directory._pending, directory.ejected())
        ranked = snapshot.rank_decode(1, 3)
        overlap = _overlap(rng, [w.worker_id for w in prefill])
        got = best_routes_from(ranked, snapshot.prefill_candidates(), 100, overlap, BS)
        want = best_routes(ranked, prefill, 100, overlap, BS)
        assert got is not None and got == want
        picked = [p.route.prefill.worker_id for p in got if p.route.prefill is not None]
        if held and rng.random() < 0.3:
            directory.release(held.pop(rng.randrange(len(held))))
        elif picked:  # the next decision must see this worker's new queue
            held.append(directory.assign(picked[0], queued_tokens=rng.randrange(1, 5) * 300))
            changed += 1
    assert changed > 20
    await directory.close()


def test_latency_decisions_follow_the_work_sent_between_them() -> None:
    """The index's latency table follows each worker's queue from one decision to the next
    (RoleIndex.put rewrites the worker's row), as the reference's views rebuilt per
    request do."""
    for seed in range(3):
        run(_latency_decisions_under_changing_work(seed))


def _info(wid: str, role: WorkerRole) -> WorkerInfo:
    return WorkerInfo(wid, role, f"{wid}:1", MODEL, BS, 100)


def test_a_worker_gone_from_the_store_is_not_picked_once_the_view_refreshes() -> None:
    async def body() -> None:
        clock = FakeClock()
        store = InMemoryClusterStore(clock=clock)
        for wid, running in (("a", 0), ("b", 1), ("c", 2)):
            store.register_worker(_info(wid, WorkerRole.BOTH), ttl_s=10)
            store.heartbeat(wid, WorkerLoadReport(num_running=running, num_free_blocks=100),
                            ttl_s=10)
        directory = WorkerDirectory(AsyncStore(store), MODEL, BS, refresh_s=3600.0)
        snap = await directory.snapshot()
        kv_aware = make_prefill_policy("kv_aware")
        assert [w.worker_id for w in snap.rank_decode(1, 3)] == ["a", "b", "c"]

        store.deregister_worker("a")
        snap = await directory.snapshot()  # not refreshed yet: the last read
        assert snap.rank_decode(1, 1)[0].worker_id == "a"
        snap = await directory.snapshot(force=True)
        assert [w.worker_id for w in snap.rank_decode(1, 3)] == ["b", "c"]
        caches_all = {"a": 8.0, "b": 1.0}  # a stale hint naming the gone worker
        assert kv_aware.pick_from(snap.prefill_candidates("c"), 128, caches_all, BS).worker_id == "b"
        assert snap.prefill_candidates().get("a") is None

        clock.now += 6
        store.heartbeat("c", None, ttl_s=10)  # b misses its heartbeats and expires
        clock.now += 5
        snap = await directory.snapshot(force=True)
        assert [w.worker_id for w in snap.rank_decode(1, 3)] == ["c"]
        assert [w.worker_id for w in snap.prefill] == ["c"]
        assert kv_aware.pick_from(snap.prefill_candidates("c"), 128, caches_all, BS) is None
        await directory.close()

    run(body())


def test_a_worker_that_changes_role_moves_between_the_indexes() -> None:
    async def body() -> None:
        store = InMemoryClusterStore()
        store.register_worker(_info("a", WorkerRole.PREFILL), ttl_s=60)
        directory = WorkerDirectory(AsyncStore(store), MODEL, BS, refresh_s=0.0)
        snap = await directory.snapshot()
        assert (snap.decode, [w.worker_id for w in snap.prefill]) == ([], ["a"])
        store.register_worker(_info("a", WorkerRole.DECODE), ttl_s=60)
        snap = await directory.snapshot()
        assert ([w.worker_id for w in snap.decode], snap.prefill) == (["a"], [])
        await directory.close()

    run(body())


def test_work_counts_until_a_report_taken_after_the_worker_answered_for_it() -> None:
    async def body() -> None:
        store = InMemoryClusterStore()
        store.register_worker(_info("d", WorkerRole.DECODE), ttl_s=60)
        directory = WorkerDirectory(AsyncStore(store), MODEL, BS, refresh_s=0.0)
        assignment = directory.assign("d", running=1, queued_tokens=900)
        # A report the worker took after the router sent the request, before the request
        # reached its engine (it is stepping): it does not show the request.
        store.heartbeat("d", WorkerLoadReport(num_free_blocks=40, updated_at=time.time()),
                        ttl_s=60)
        view = (await directory.snapshot(force=True)).decode[0]
        assert (view.num_running, view.num_queued_tokens) == (0, 0)
        directory.delivered(assignment)  # the worker admitted it
        view = (await directory.snapshot()).decode[0]
        assert (view.num_running, view.num_queued_tokens) == (1, 900)
        # Its next report is taken after that, and shows the request itself.
        time.sleep(0.002)
        store.heartbeat("d", WorkerLoadReport(num_running=1, num_queued_tokens=900,
                                              num_free_blocks=40, updated_at=time.time()),
                        ttl_s=60)
        view = (await directory.snapshot(force=True)).decode[0]
        assert (view.num_running, view.num_queued_tokens) == (1, 900)
        directory.release(assignment)
        directory.delivered(assignment)  # released: nothing to count any more
        assert (await directory.snapshot()).decode[0].num_running == 1
        await directory.close()

    run(body())
