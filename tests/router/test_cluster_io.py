"""The router's view of cluster state: worker snapshots with not-yet-reported work, and
the request ledger, over a real in-memory store."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Coroutine
from typing import Any

import pytest

from splitserve.cluster import InMemoryClusterStore
from splitserve.cluster.store import (
    RequestLedgerEntry,
    RequestPhase,
    WorkerInfo,
    WorkerLoadReport,
    WorkerRole,
)
from splitserve.router import cluster_io
from splitserve.router import workers as workers_module
from splitserve.router.cluster_io import AsyncStore, RequestLedger
from splitserve.router.workers import WorkerDirectory

TTL_S = 60.0


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 10))


def info(worker_id: str, role: WorkerRole, block_size: int = 16, model: str = "m") -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, role=role, address=f"127.0.0.1:{len(worker_id)}",
                      model=model, block_size=block_size, num_total_blocks=100,
                      kv_endpoint=f"kv://{worker_id}")


def test_snapshot_splits_roles_and_skips_mismatched_workers() -> None:
    async def body() -> None:
        store = InMemoryClusterStore()
        for i in (info("p0", WorkerRole.PREFILL), info("d0", WorkerRole.DECODE),
                  info("b0", WorkerRole.BOTH), info("x0", WorkerRole.DECODE, block_size=8),
                  info("y0", WorkerRole.DECODE, model="other"), info("z0", WorkerRole.DECODE, model="")):
            store.register_worker(i, TTL_S)
        directory = WorkerDirectory(AsyncStore(store), "m", 16, refresh_s=0.0)
        snap = await directory.snapshot()
        assert [w.worker_id for w in snap.decode] == ["b0", "d0", "z0"]  # empty model: accepted
        assert [w.worker_id for w in snap.prefill] == ["b0", "p0"]
        assert snap.num_ignored == 2
        d0 = snap.decode[1]
        # Never reported a load: all blocks free, nothing running.
        assert (d0.address, d0.kv_endpoint, d0.num_free_blocks, d0.num_running) == (
            "127.0.0.1:2", "kv://d0", 100, 0)
        await directory.close()

    run(body())


def test_snapshot_is_cached_for_refresh_s_unless_forced() -> None:
    async def body() -> None:
        store = InMemoryClusterStore()
        directory = WorkerDirectory(AsyncStore(store), "m", 16, refresh_s=3600.0)
        assert (await directory.snapshot()).decode == []
        store.register_worker(info("d0", WorkerRole.DECODE), TTL_S)
        assert (await directory.snapshot()).decode == []  # still the cached read
        assert [w.worker_id for w in (await directory.snapshot(force=True)).decode] == ["d0"]

    run(body())


class _SlowStore:
    """The in-memory store behind reads that take `delay_s` (a store across a busy host);
    not an InMemoryClusterStore itself, so AsyncStore calls it off the loop, as it calls
    Redis or a remote store."""

    def __init__(self, delay_s: float) -> None:
        self.inner = InMemoryClusterStore()
        self.delay_s = delay_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def live_workers(self) -> Any:
        time.sleep(self.delay_s)
        return self.inner.live_workers()


@pytest.mark.parametrize("refresh_s", [0.0, 3600.0])
def test_a_router_without_a_view_waits_for_its_first_read(refresh_s: float) -> None:
    """A first store read slower than the usual wait (0.5 s): every caller meanwhile, the
    one that started the read and the ones that found it in flight, gets its result, not
    an empty view that says "no workers"."""
    async def body() -> None:
        store = _SlowStore(delay_s=1.0)
        store.register_worker(info("d0", WorkerRole.DECODE), TTL_S)
        directory = WorkerDirectory(AsyncStore(store), "m", 16,  # type: ignore[arg-type]
                                    refresh_s=refresh_s)
        snaps = await asyncio.gather(*(directory.snapshot() for _ in range(3)))
        assert [[w.worker_id for w in snap.decode] for snap in snaps] == [["d0"]] * 3
        store.delay_s = 0.0
        await directory.close()

    run(body())


def test_work_sent_after_the_last_report_is_added_to_it() -> None:
    async def body() -> None:
        store = InMemoryClusterStore()
        store.register_worker(info("d0", WorkerRole.DECODE), TTL_S)
        store.register_worker(info("p0", WorkerRole.PREFILL), TTL_S)
        old = time.time() - 10.0
        store.heartbeat("d0", WorkerLoadReport(num_running=2, num_waiting=1, num_free_blocks=50,
                                               updated_at=old), TTL_S)
        store.heartbeat("p0", WorkerLoadReport(num_queued_tokens=100, updated_at=old), TTL_S)
        directory = WorkerDirectory(AsyncStore(store), "m", 16, refresh_s=0.0)
        a = directory.assign("d0", running=1, blocks=20)
        b = directory.assign("d0", running=1, blocks=40)
        q = directory.assign("p0", queued_tokens=300)
        snap = await directory.snapshot()
        d0, p0 = snap.decode[0], snap.prefill[0]
        assert (d0.num_running, d0.num_waiting, d0.num_free_blocks) == (4, 1, 0)  # 50 - 60, floored
        assert p0.num_queued_tokens == 400
        directory.release(a)
        directory.release(q)
        directory.release(q)  # twice is harmless
        snap = await directory.snapshot()
        assert (snap.decode[0].num_running, snap.decode[0].num_free_blocks) == (3, 10)
        assert snap.prefill[0].num_queued_tokens == 100
        # A newer report already counts `b`: it is not added again.
        store.heartbeat("d0", WorkerLoadReport(num_running=3, num_free_blocks=10), TTL_S)
        snap = await directory.snapshot()
        assert (snap.decode[0].num_running, snap.decode[0].num_free_blocks) == (3, 10)
        directory.release(b)

    run(body())


def test_stubs_share_one_channel_per_address() -> None:
    async def body() -> None:
        store = InMemoryClusterStore()
        store.register_worker(info("b0", WorkerRole.BOTH), TTL_S)
        directory = WorkerDirectory(AsyncStore(store), "m", 16, refresh_s=0.0)
        b0 = (await directory.snapshot()).decode[0]
        directory.decode_stub(b0)
        directory.prefill_stub(b0)
        assert list(directory._channels) == ["127.0.0.1:2"]
        await directory.close()
        assert directory._channels == {}

    run(body())


def test_ledger_follows_the_phases_and_is_deleted() -> None:
    async def body() -> None:
        store = InMemoryClusterStore()
        ledger = RequestLedger(AsyncStore(store), "r1", num_prompt_tokens=40)
        ledger.update(RequestPhase.QUEUED)
        ledger.update(RequestPhase.ADMITTED, decode_worker_id="d0", num_decode_blocks=3)
        ledger.update(RequestPhase.PREFILLING, prefill_worker_id="p0", num_prefill_blocks=3)
        await asyncio.sleep(0.01)
        entry = store.ledger_get("r1")
        assert entry is not None
        assert (entry.phase, entry.decode_worker_id, entry.prefill_worker_id) == (
            RequestPhase.PREFILLING, "d0", "p0")
        assert (entry.num_prompt_tokens, entry.num_decode_blocks, entry.num_prefill_blocks) == (
            40, 3, 3)
        assert [e.request_id for e in store.ledger_by_worker("p0")] == ["r1"]
        ledger.update(RequestPhase.DECODING, num_generated_tokens=1)
        await ledger.delete()
        assert store.ledger_get("r1") is None
        assert ledger.phase is RequestPhase.DECODING

    run(body())


def test_ledger_progress_is_written_on_phase_change_then_about_every_second(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        store = InMemoryClusterStore()
        ledger = RequestLedger(AsyncStore(store), "r3", num_prompt_tokens=4)
        ledger.update(RequestPhase.ADMITTED)
        ledger.progress(RequestPhase.DECODING, 2)  # a phase change: written at once
        ledger.progress(RequestPhase.DECODING, 3)  # within the second: skipped
        await asyncio.sleep(0.01)
        entry = store.ledger_get("r3")
        assert entry is not None
        assert (entry.phase, entry.num_generated_tokens) == (RequestPhase.DECODING, 2)
        later = time.time() + 1.5
        monkeypatch.setattr(cluster_io.time, "time", lambda: later)
        ledger.progress(RequestPhase.DECODING, 9)
        await asyncio.sleep(0.01)
        entry = store.ledger_get("r3")
        assert entry is not None and entry.num_generated_tokens == 9
        await ledger.delete()

    run(body())


def test_a_ledger_never_written_deletes_nothing() -> None:
    async def body() -> None:
        store = InMemoryClusterStore()
        store.ledger_put(RequestLedgerEntry("r2", RequestPhase.QUEUED))
        await RequestLedger(AsyncStore(store), "r2", 5).delete()
        assert store.ledger_get("r2") is not None

    run(body())


def test_a_worker_restarted_at_its_address_gets_a_fresh_channel() -> None:
    """The old channel may be in reconnect backoff (every call UNAVAILABLE for seconds):
    a new registration (a new started_at) at the same address replaces it at once."""
    async def body() -> None:
        store = InMemoryClusterStore()
        store.register_worker(info("d0", WorkerRole.DECODE), TTL_S)
        directory = WorkerDirectory(AsyncStore(store), "m", 16, refresh_s=0.0)
        channels = directory._channels  # address -> channel
        view = (await directory.snapshot()).decode[0]
        directory.decode_stub(view)
        first = channels[view.address]
        view = (await directory.snapshot()).decode[0]  # same registration: same channel
        directory.decode_stub(view)
        assert channels[view.address] is first
        restarted = dataclasses.replace(info("d0", WorkerRole.DECODE), started_at=time.time() + 1)
        store.register_worker(restarted, TTL_S)
        view = (await directory.snapshot()).decode[0]
        assert view.address not in channels  # the old one was closed
        directory.decode_stub(view)
        assert channels[view.address] is not first
        await directory.close()

    run(body())


def test_a_worker_that_lost_a_request_sits_out_a_growing_cooldown(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        store = InMemoryClusterStore()
        for port, i in enumerate((info("p0", WorkerRole.PREFILL), info("p1", WorkerRole.PREFILL),
                                  info("d0", WorkerRole.DECODE), info("d1", WorkerRole.DECODE))):
            store.register_worker(dataclasses.replace(i, address=f"127.0.0.1:{9000 + port}"),
                                  TTL_S)
        directory = WorkerDirectory(AsyncStore(store), "m", 16, refresh_s=0.0)
        now = [1000.0]
        monkeypatch.setattr(workers_module.time, "monotonic", lambda: now[0])
        snap = await directory.snapshot()
        view = {w.worker_id: w for w in [*snap.prefill, *snap.decode]}

        async def ids() -> tuple[list[str], list[str]]:
            snap = await directory.snapshot()
            return [w.worker_id for w in snap.prefill], [w.worker_id for w in snap.decode]

        directory.eject(view["p0"], "prefill timed out")
        directory.eject(view["d0"], "stream broke")
        directory.eject(view["d0"], "the same death, seen by another request")
        assert await ids() == (["p1"], ["d1"])
        now[0] += 5.1  # first cooldown over: offered again
        assert await ids() == (["p0", "p1"], ["d0", "d1"])
        directory.eject(view["p0"], "failed again")  # twice as long now
        now[0] += 5.1
        assert (await ids())[0] == ["p1"]
        now[0] += 5.0
        assert (await ids())[0] == ["p0", "p1"]
        directory.succeeded(view["p0"])
        directory.eject(view["p0"], "fresh failure")  # counts from one again
        now[0] += 5.1
        assert (await ids())[0] == ["p0", "p1"]
        directory.eject(view["d0"], "x")
        directory.eject(view["d1"], "y")  # every decode worker out: all offered anyway
        assert (await ids())[1] == ["d0", "d1"]
        # The same worker id restarted at another address is a fresh worker.
        directory.eject(view["p1"], "z")
        store.register_worker(dataclasses.replace(info("p1", WorkerRole.PREFILL),
                                                  address="127.0.0.1:9100"), TTL_S)
        now[0] += 0.01  # (a fresh store read)
        assert (await ids())[0] == ["p0", "p1"]
        await directory.close()

    run(body())


def test_weighted_prefix_overlap_is_weighted_overlap_of_the_tiers_on_every_path() -> None:
    """What a routing decision weighs (AsyncStore.weighted_prefix_overlap) equals
    weighted_overlap(prefix_overlap_tiers) read in the one pass of the in-memory store, and
    through a store that only answers prefix_overlap_tiers (a ClusterState server over
    gRPC); with host and disk tiers, device alone, a scope, and no hashes."""
    from splitserve.cluster.remote import RemoteClusterStore, start_cluster_state_server
    from splitserve.common.cluster_types import WorkerIdUnion
    from splitserve.router.policy import RoutingRules, weighted_overlap

    memory = InMemoryClusterStore()
    server, port = start_cluster_state_server(memory, token="a-test-cluster-token")
    remote = RemoteClusterStore(f"127.0.0.1:{port}", token="a-test-cluster-token")
    rules = RoutingRules(host_block_weight=0.6, disk_block_weight=0.3)
    prompt = [11, 12, 13, 14, 15]
    for i in range(6):
        memory.register_worker(info(f"p{i}", WorkerRole.PREFILL), TTL_S)
        memory.publish_prefix_events(f"p{i}", prompt[:i], [])
    scope = WorkerIdUnion(frozenset({"p1", "p2", "p3"}), {"p5"})

    async def body() -> None:
        for tiered in (False, True):
            if tiered:  # p4 holds its last two blocks on the host, p5 one on disk
                memory.publish_prefix_events("p4", [14, 15], [], tier="host")
                memory.publish_prefix_events("p5", [13], [], tier="disk")
            for among in (None, scope):
                expect = weighted_overlap(memory.prefix_overlap_tiers(prompt, among), rules)
                for store in (memory, remote):
                    got = await AsyncStore(store).weighted_prefix_overlap(prompt, among, rules)
                    assert dict(got) == expect, (store, tiered, among)
        assert await AsyncStore(memory).weighted_prefix_overlap([], None, rules) == {}
        runs = await AsyncStore(memory).weighted_prefix_overlap(prompt, None, rules)
        assert runs["p4"] == 4 + 0.6  # 11-14 on its device, 15 on its host
        assert runs["p5"] == 5 and "p0" not in runs

    try:
        run(body())
    finally:
        remote.close()
        server.stop(0)
