"""In-process ClusterStore: the single-machine stand-in for Redis.

One lock guards everything; every method is O(size of its arguments + live workers), so
contention is not a concern at the rates routers and workers call it. TTLs run on an
injectable monotonic clock so tests can expire workers without sleeping.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from splitserve.cluster.store import (
    KV_TIERS,
    ClusterStore,
    LiveWorker,
    PrefixOverlap,
    RequestLedgerEntry,
    WorkerInfo,
    WorkerLoadReport,
    WorkerRole,
    check_block_hashes,
    check_service_deltas,
    check_tier,
    check_ttl,
    leading_run,
    tiered_run,
)


@dataclass
class _Worker:
    info: WorkerInfo
    expires_at: float  # on the store's clock
    load: WorkerLoadReport | None = None
    # tier -> block hashes it holds there ("device": its prefix cache)
    tiers: dict[str, set[int]] = field(default_factory=lambda: {t: set() for t in KV_TIERS})


class InMemoryClusterStore(ClusterStore):
    """A thread-safe ClusterStore in this process's memory.

    `clock` returns seconds on a monotonic scale (default `time.monotonic`); only TTLs use
    it. Expired workers are purged lazily by the next call that looks at them.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._workers: dict[str, _Worker] = {}
        # tier -> block hash -> ids of workers holding it there (live or not yet purged)
        self._holders: dict[str, dict[int, set[str]]] = {t: {} for t in KV_TIERS}
        self._ledger: dict[str, RequestLedgerEntry] = {}
        self._service: dict[str, float] = {}

    # ---- registry ---------------------------------------------------------------------

    def register_worker(self, info: WorkerInfo, ttl_s: float) -> None:
        check_ttl(ttl_s)
        with self._lock:
            self._drop_worker(info.worker_id)
            self._workers[info.worker_id] = _Worker(info, self._clock() + ttl_s)

    def heartbeat(self, worker_id: str, load: WorkerLoadReport | None, ttl_s: float) -> bool:
        check_ttl(ttl_s)
        with self._lock:
            worker = self._live(worker_id)
            if worker is None:
                return False
            worker.expires_at = self._clock() + ttl_s
            if load is not None:
                worker.load = load
            return True

    def deregister_worker(self, worker_id: str) -> None:
        with self._lock:
            self._drop_worker(worker_id)

    def live_workers(self, role: WorkerRole | None = None) -> list[LiveWorker]:
        with self._lock:
            self._purge_expired()
            return [
                (w.info, w.load)
                for _, w in sorted(self._workers.items())
                if role is None or w.info.role.can_serve(role)
            ]

    # ---- prefix index -----------------------------------------------------------------

    def publish_prefix_events(
        self, worker_id: str, stored_hashes: list[int], evicted_hashes: list[int],
        tier: str = "device",
    ) -> None:
        check_tier(tier)
        check_block_hashes(stored_hashes)
        check_block_hashes(evicted_hashes)
        with self._lock:
            worker = self._live(worker_id)
            if worker is None:
                return  # a dead worker's cache is forgotten; it republishes on register
            holds, holders = worker.tiers[tier], self._holders[tier]
            for h in stored_hashes:
                holds.add(h)
                holders.setdefault(h, set()).add(worker_id)
            for h in evicted_hashes:
                holds.discard(h)
                self._discard_holder(tier, h, worker_id)

    def prefix_overlap(self, block_hashes: list[int]) -> dict[str, int]:
        check_block_hashes(block_hashes)
        with self._lock:
            self._purge_expired()
            if not block_hashes:
                return {}
            # Only workers holding the first block can have a non-empty leading run.
            candidates = self._holders["device"].get(block_hashes[0], set())
            overlap = {
                wid: leading_run(block_hashes, self._workers[wid].tiers["device"])
                for wid in candidates
            }
            return dict(sorted(overlap.items()))

    def prefix_overlap_tiers(self, block_hashes: list[int]) -> dict[str, PrefixOverlap]:
        check_block_hashes(block_hashes)
        with self._lock:
            self._purge_expired()
            if not block_hashes:
                return {}
            candidates = set().union(*(self._holders[t].get(block_hashes[0], set())
                                       for t in KV_TIERS))
            return {wid: tiered_run(block_hashes, self._workers[wid].tiers)
                    for wid in sorted(candidates)}

    # ---- request ledger ---------------------------------------------------------------

    def ledger_put(self, entry: RequestLedgerEntry) -> None:
        with self._lock:
            self._ledger[entry.request_id] = entry

    def ledger_get(self, request_id: str) -> RequestLedgerEntry | None:
        with self._lock:
            return self._ledger.get(request_id)

    def ledger_delete(self, request_id: str) -> bool:
        with self._lock:
            return self._ledger.pop(request_id, None) is not None

    def ledger_by_worker(self, worker_id: str) -> list[RequestLedgerEntry]:
        with self._lock:
            return [e for _, e in sorted(self._ledger.items()) if e.names_worker(worker_id)]

    def add_service(self, deltas: Mapping[str, float]) -> dict[str, float]:
        check_service_deltas(deltas)
        with self._lock:
            for client, delta in deltas.items():
                self._service[client] = self._service.get(client, 0.0) + delta
            return dict(self._service)

    # ---- internals (caller holds the lock) --------------------------------------------

    def _live(self, worker_id: str) -> _Worker | None:
        worker = self._workers.get(worker_id)
        if worker is not None and worker.expires_at <= self._clock():
            self._drop_worker(worker_id)
            return None
        return worker

    def _purge_expired(self) -> None:
        now = self._clock()
        for wid in [wid for wid, w in self._workers.items() if w.expires_at <= now]:
            self._drop_worker(wid)

    def _drop_worker(self, worker_id: str) -> None:
        worker = self._workers.pop(worker_id, None)
        if worker is not None:
            for tier, hashes in worker.tiers.items():
                for h in hashes:
                    self._discard_holder(tier, h, worker_id)

    def _discard_holder(self, tier: str, block_hash: int, worker_id: str) -> None:
        holders = self._holders[tier].get(block_hash)
        if holders is not None:
            holders.discard(worker_id)
            if not holders:
                del self._holders[tier][block_hash]
