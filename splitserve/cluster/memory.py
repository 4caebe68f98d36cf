"""In-process ClusterStore: the single-machine stand-in for Redis.

One lock guards everything; a prefix lookup costs O(blocks x holders of the prompt's first
block) (cluster.prefix_index), and live_workers O(live workers). TTLs run on an injectable
monotonic clock so tests can expire workers without sleeping; expired workers are looked
for only once the earliest expiry may have passed, not on every call.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from splitserve.cluster.prefix_index import PrefixIndex
from splitserve.cluster.store import (
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
)


@dataclass
class _Worker:
    info: WorkerInfo
    expires_at: float  # on the store's clock
    load: WorkerLoadReport | None = None


class InMemoryClusterStore(ClusterStore):
    """A thread-safe ClusterStore in this process's memory.

    `clock` returns seconds on a monotonic scale (default `time.monotonic`); only TTLs use
    it. Expired workers are purged lazily by the next call that looks at them.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._workers: dict[str, _Worker] = {}
        self._prefixes = PrefixIndex()  # of workers live or not yet purged
        self._next_expiry = float("inf")  # no worker expires before this (a lower bound)
        self._ledger: dict[str, RequestLedgerEntry] = {}
        self._service: dict[str, float] = {}

    # ---- registry ---------------------------------------------------------------------

    def register_worker(self, info: WorkerInfo, ttl_s: float) -> None:
        check_ttl(ttl_s)
        with self._lock:
            self._drop_worker(info.worker_id)
            expires_at = self._clock() + ttl_s
            self._workers[info.worker_id] = _Worker(info, expires_at)
            self._next_expiry = min(self._next_expiry, expires_at)

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
            self._prefixes.apply(worker_id, tier, stored_hashes, evicted_hashes)

    def prefix_overlap(self, block_hashes: list[int]) -> dict[str, int]:
        check_block_hashes(block_hashes)
        with self._lock:
            self._purge_expired()
            return self._prefixes.overlap(block_hashes)

    def prefix_overlap_tiers(self, block_hashes: list[int], among: AbstractSet[str] | None = None
                             ) -> dict[str, PrefixOverlap]:
        check_block_hashes(block_hashes)
        with self._lock:
            self._purge_expired()
            return self._prefixes.overlap_tiers(block_hashes, among)

    def weighted_prefix_overlap(self, block_hashes: list[int], among: AbstractSet[str] | None,
                                host_weight: float, disk_weight: float) -> Mapping[str, float]:
        """PrefixIndex.weighted_runs of the live workers' caches: what the router weighs
        (router.policy.weighted_overlap of prefix_overlap_tiers), in one pass. The hashes
        are not checked: the router made them, and a read of a hash no worker can hold
        finds nothing."""
        with self._lock:
            self._purge_expired()
            return self._prefixes.weighted_runs(block_hashes, among, host_weight, disk_weight)

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
        if now < self._next_expiry:
            return
        for wid in [wid for wid, w in self._workers.items() if w.expires_at <= now]:
            self._drop_worker(wid)
        self._next_expiry = min((w.expires_at for w in self._workers.values()),
                                default=float("inf"))

    def _drop_worker(self, worker_id: str) -> None:
        if self._workers.pop(worker_id, None) is not None:
            self._prefixes.drop(worker_id)
