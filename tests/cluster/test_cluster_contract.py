"""One contract, three backends: in-memory, Redis (a real redis-server), remote (real gRPC).

TTLs are generous around every check (0.6 s TTL, 0.2 s margins) because the Redis backend
expires keys in real time; the other two advance a fake clock instead of sleeping.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from splitserve.cluster.store import (
    MAX_BLOCK_HASH,
    ClusterStore,
    PrefixOverlap,
    RequestLedgerEntry,
    RequestPhase,
    WorkerInfo,
    WorkerLoadReport,
    WorkerRole,
)
from splitserve.common.step_time import StepTimeModel

TTL_S = 0.6
LONG_TTL_S = 60.0


def _info(worker_id: str, role: WorkerRole = WorkerRole.DECODE) -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id,
        role=role,
        address=f"127.0.0.1:{5000 + len(worker_id)}",
        model="smollm2-135m",
        block_size=16,
        num_total_blocks=1024,
        kv_endpoint=f"gloo://127.0.0.1:29500?rank={len(worker_id)}",
        started_at=1_700_000_000.123456,
        output_endpoint="" if role is WorkerRole.PREFILL else f"127.0.0.1:{6000 + len(worker_id)}",
    )


def _load(num_waiting: int, num_free_blocks: int) -> WorkerLoadReport:
    return WorkerLoadReport(
        num_waiting=num_waiting,
        num_running=3,
        num_free_blocks=num_free_blocks,
        num_queued_tokens=2**40,  # wider than 32 bits on purpose
        updated_at=1_700_000_001.5,
    )


def _ids(store: ClusterStore, role: WorkerRole | None = None) -> list[str]:
    return [info.worker_id for info, _ in store.live_workers(role)]


def test_register_round_trips_info_and_filters_by_role(backend: Any) -> None:
    store: ClusterStore = backend.store
    infos = [
        _info("p0", WorkerRole.PREFILL),
        _info("d0", WorkerRole.DECODE),
        _info("both0", WorkerRole.BOTH),
    ]
    for info in infos:
        store.register_worker(info, LONG_TTL_S)
    by_id = sorted(infos, key=lambda i: i.worker_id)
    assert store.live_workers() == [(info, None) for info in by_id]
    assert _ids(store, WorkerRole.PREFILL) == ["both0", "p0"]
    assert _ids(store, WorkerRole.DECODE) == ["both0", "d0"]
    assert _ids(store, WorkerRole.BOTH) == ["both0"]


def test_heartbeat_replaces_load_and_keeps_it_when_none(backend: Any) -> None:
    store: ClusterStore = backend.store
    store.register_worker(_info("d0"), LONG_TTL_S)
    assert store.heartbeat("d0", _load(1, 100), LONG_TTL_S) is True
    assert store.live_workers() == [(_info("d0"), _load(1, 100))]
    assert store.heartbeat("d0", None, LONG_TTL_S) is True
    assert store.live_workers() == [(_info("d0"), _load(1, 100))]
    assert store.heartbeat("d0", _load(7, 0), LONG_TTL_S) is True
    assert store.live_workers()[0][1] == _load(7, 0)
    assert store.heartbeat("nobody", _load(1, 1), LONG_TTL_S) is False
    assert _ids(store) == ["d0"]


def test_a_load_carries_the_workers_step_time_model(backend: Any) -> None:
    store: ClusterStore = backend.store
    store.register_worker(_info("d0"), LONG_TTL_S)
    model = StepTimeModel(base_ms=3.25, per_seq_ms=0.125, per_prompt_token_ms=0.0625,
                          token_budget=2048)
    load = WorkerLoadReport(num_running=2, updated_at=1_700_000_002.0, step_model=model)
    assert store.heartbeat("d0", load, LONG_TTL_S) is True
    assert store.live_workers()[0][1] == load
    assert store.heartbeat("d0", _load(1, 1), LONG_TTL_S) is True  # and none again
    assert store.live_workers()[0][1].step_model is None


def test_ttl_expiry_and_heartbeat_extension(backend: Any) -> None:
    store: ClusterStore = backend.store
    store.register_worker(_info("a"), TTL_S)
    store.register_worker(_info("b"), TTL_S)
    backend.advance(TTL_S - 0.2)
    assert store.heartbeat("a", None, TTL_S) is True  # a's TTL restarts now
    backend.advance(0.4)  # b is past its TTL, a is not
    assert store.heartbeat("b", None, TTL_S) is False  # expired: must register again
    assert _ids(store) == ["a"]
    backend.advance(TTL_S + 0.2)
    assert _ids(store) == []
    assert store.heartbeat("a", _load(0, 1), TTL_S) is False
    store.register_worker(_info("a"), LONG_TTL_S)
    assert store.live_workers() == [(_info("a"), None)]


def test_deregister_removes_worker_and_its_prefix_entries(backend: Any) -> None:
    store: ClusterStore = backend.store
    store.register_worker(_info("a"), LONG_TTL_S)
    store.register_worker(_info("b"), LONG_TTL_S)
    store.publish_prefix_events("a", [11, 12], [])
    store.publish_prefix_events("b", [11], [])
    store.deregister_worker("a")
    store.deregister_worker("never-registered")
    assert _ids(store) == ["b"]
    assert store.prefix_overlap([11, 12]) == {"b": 1}
    assert store.heartbeat("a", None, LONG_TTL_S) is False


def test_prefix_overlap_counts_leading_runs_exactly(backend: Any) -> None:
    store: ClusterStore = backend.store
    for wid in ("a", "b", "c", "d"):
        store.register_worker(_info(wid), LONG_TTL_S)
    top = MAX_BLOCK_HASH  # the widest hash the contract allows
    store.publish_prefix_events("a", [1, 2, top], [])
    store.publish_prefix_events("b", [1, top], [])  # holds block 2 but not block 1
    store.publish_prefix_events("c", [2, top], [])  # no first block: no leading run
    chain = [1, 2, top, 4]
    assert store.prefix_overlap(chain) == {"a": 3, "b": 1}
    assert store.prefix_overlap(chain[:1]) == {"a": 1, "b": 1}
    assert store.prefix_overlap([2, top]) == {"a": 2, "c": 2}
    assert store.prefix_overlap([]) == {}
    assert store.prefix_overlap([99]) == {}
    store.publish_prefix_events("a", [4], [2])  # stored first, then evicted
    assert store.prefix_overlap(chain) == {"a": 1, "b": 1}
    store.publish_prefix_events("b", [2], [1])
    assert store.prefix_overlap(chain) == {"a": 1}


def test_prefix_overlap_tiers_counts_each_block_in_its_fastest_tier(backend: Any) -> None:
    store: ClusterStore = backend.store
    for wid in ("a", "b", "c"):
        store.register_worker(_info(wid), LONG_TTL_S)
    chain = [1, 2, 3, 4, 5]
    store.publish_prefix_events("a", [1, 2], [])
    store.publish_prefix_events("a", [2, 3, 4], [], tier="host")  # 2 is on both: device
    store.publish_prefix_events("a", [5], [], tier="disk")
    store.publish_prefix_events("b", [1, 2, 3], [], tier="host")  # host only
    store.publish_prefix_events("c", [2, 3], [], tier="disk")  # no first block: no run
    assert store.prefix_overlap_tiers(chain) == {
        "a": PrefixOverlap(device_blocks=2, host_blocks=2, disk_blocks=1),
        "b": PrefixOverlap(host_blocks=3),
    }
    assert store.prefix_overlap(chain) == {"a": 2}  # the device alone, as before
    # Only the workers asked about (a set, or a dict's keys), the others not computed.
    assert store.prefix_overlap_tiers(chain, frozenset({"b", "c", "z"})) == {
        "b": PrefixOverlap(host_blocks=3)}
    assert store.prefix_overlap_tiers(chain, {"a": None}.keys()) == {
        "a": PrefixOverlap(device_blocks=2, host_blocks=2, disk_blocks=1)}
    assert store.prefix_overlap_tiers(chain, set()) == {}
    store.publish_prefix_events("a", [], [3], tier="host")  # the run breaks at block 3
    store.publish_prefix_events("b", [3], [1], tier="host")
    assert store.prefix_overlap_tiers(chain) == {"a": PrefixOverlap(device_blocks=2)}
    store.deregister_worker("a")  # every tier of it goes
    store.register_worker(_info("a"), LONG_TTL_S)
    assert store.prefix_overlap_tiers([2, 3]) == {"b": PrefixOverlap(host_blocks=2),
                                                  "c": PrefixOverlap(disk_blocks=2)}
    assert store.prefix_overlap_tiers([]) == {}
    with pytest.raises(ValueError):
        store.publish_prefix_events("a", [1], [], tier="tape")


def test_dead_workers_prefix_entries_are_ignored_and_not_inherited(backend: Any) -> None:
    store: ClusterStore = backend.store
    store.register_worker(_info("short"), TTL_S)
    store.register_worker(_info("long"), LONG_TTL_S)
    store.publish_prefix_events("short", [1, 2, 3], [])
    store.publish_prefix_events("long", [1], [])
    assert store.prefix_overlap([1, 2, 3]) == {"long": 1, "short": 3}
    backend.advance(TTL_S + 0.2)
    store.publish_prefix_events("short", [4], [])  # from a dead worker: dropped
    assert store.prefix_overlap([1, 2, 3]) == {"long": 1}
    assert store.prefix_overlap([4]) == {}
    store.register_worker(_info("short"), LONG_TTL_S)  # a new life starts empty
    assert store.prefix_overlap([1, 2, 3]) == {"long": 1}
    store.publish_prefix_events("short", [1, 2], [])
    assert store.prefix_overlap([1, 2, 3]) == {"long": 1, "short": 2}


def test_prefix_overlap_matches_reference_under_random_events(backend: Any) -> None:
    store: ClusterStore = backend.store
    rng = random.Random(1234)
    workers = ["w0", "w1", "w2"]
    reference: dict[str, set[int]] = {w: set() for w in workers}
    for w in workers:
        store.register_worker(_info(w), LONG_TTL_S)
    for _ in range(40):
        w = rng.choice(workers)
        stored = rng.sample(range(8), rng.randint(0, 4))
        evicted = rng.sample(range(8), rng.randint(0, 2))
        store.publish_prefix_events(w, stored, evicted)
        reference[w] = (reference[w] | set(stored)) - set(evicted)
        chain = rng.sample(range(8), rng.randint(1, 6))
        expected = {}
        for wid, held in reference.items():
            run = next((i for i, h in enumerate(chain) if h not in held), len(chain))
            if run:
                expected[wid] = run
        assert store.prefix_overlap(chain) == expected


def test_ledger_crud_and_lookup_by_worker(backend: Any) -> None:
    store: ClusterStore = backend.store
    r1 = RequestLedgerEntry(
        request_id="r1",
        phase=RequestPhase.PREFILLING,
        prefill_worker_id="p0",
        decode_worker_id="d0",
        num_prompt_tokens=40,
        num_prefill_blocks=3,
        num_decode_blocks=3,
        updated_at=1_700_000_002.25,
    )
    r2 = RequestLedgerEntry("r2", RequestPhase.DECODING, decode_worker_id="d0", updated_at=5.0)
    store.ledger_put(r2)
    store.ledger_put(r1)
    assert store.ledger_get("r1") == r1
    assert store.ledger_get("missing") is None
    assert store.ledger_by_worker("d0") == [r1, r2]
    assert store.ledger_by_worker("p0") == [r1]
    assert store.ledger_by_worker("nobody") == []
    # r1 moves on: prefill done, moved to another decode worker after d0 died
    moved = RequestLedgerEntry(
        "r1",
        RequestPhase.DECODING,
        decode_worker_id="d1",
        num_generated_tokens=9,
        updated_at=1_700_000_003.0,
    )
    store.ledger_put(moved)
    assert store.ledger_get("r1") == moved
    assert store.ledger_by_worker("p0") == []
    assert store.ledger_by_worker("d0") == [r2]
    assert store.ledger_by_worker("d1") == [moved]
    assert store.ledger_delete("r1") is True
    assert store.ledger_delete("r1") is False
    assert store.ledger_get("r1") is None
    assert store.ledger_by_worker("d1") == []


def test_invalid_arguments_raise_value_error(backend: Any) -> None:
    store: ClusterStore = backend.store
    store.register_worker(_info("a"), LONG_TTL_S)
    with pytest.raises(ValueError):
        store.register_worker(_info("b"), 0)
    with pytest.raises(ValueError):
        store.heartbeat("a", None, -1.0)
    with pytest.raises(ValueError):
        store.publish_prefix_events("a", [MAX_BLOCK_HASH + 1], [])
    with pytest.raises(ValueError):
        store.prefix_overlap([-1])
    assert _ids(store) == ["a"]


def test_service_totals_add_up_across_callers(backend: Any) -> None:
    """Fair-share counters shared by the routers of a deployment (router.fairness)."""
    store: ClusterStore = backend.store
    assert store.add_service({}) == {}
    assert store.add_service({"alice": 10.5, "bob": 2.0}) == {"alice": 10.5, "bob": 2.0}
    assert store.add_service({"alice": 4.5, "carol": 0.0}) == {
        "alice": 15.0, "bob": 2.0, "carol": 0.0}
    assert store.add_service({})["alice"] == 15.0
    for bad in ({"alice": -1.0}, {"alice": float("nan")}, {"alice": float("inf")},
                {"": 1.0}):
        with pytest.raises(ValueError):
            store.add_service(bad)
    assert store.add_service({})["alice"] == 15.0
