"""The cluster state interface shared by the router and the workers.

A `ClusterStore` holds four things (DESIGN.md, "Cluster state"):
- the worker registry: who is alive (registration + heartbeats within a TTL), where to reach
  it, and its latest load;
- the prefix index: block hash -> workers whose prefix cache holds that block, fed by the
  workers' stored/evicted events, per tier (device, host, disk: `KV_TIERS`);
- the request ledger: which workers hold a request's KV blocks, and how far it got.

Liveness: a worker is live from `register_worker` until its TTL elapses without a
`heartbeat`, or until `deregister_worker`. A dead worker is absent from `live_workers` and
`prefix_overlap`; its prefix entries are dropped (at once on deregistration, lazily after
expiry). Registering starts a worker with an empty prefix set, so a restarted worker never
inherits what its previous incarnation cached.

Block hashes are chained (a block's hash covers every token before it) and are ints in
[0, 2**64). Times in the dataclasses are seconds since the Unix epoch, stamped by whoever
built the object; TTLs are measured on the store's own clock.
"""

from __future__ import annotations

import abc
import itertools
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING

from splitserve.common.cluster_types import (
    KV_TIERS,
    PrefixOverlap,
    RequestLedgerEntry,
    RequestPhase,
    WorkerInfo,
    WorkerLoadReport,
    WorkerRole,
)

if TYPE_CHECKING:
    from splitserve.cluster.prefix_mirror import PrefixMirror

__all__ = [
    "KV_TIERS",
    "MAX_BLOCK_HASH",
    "PrefixOverlap",
    "check_service_deltas",
    "ClusterStore",
    "LiveWorker",
    "RequestLedgerEntry",
    "RequestPhase",
    "WorkerInfo",
    "WorkerLoadReport",
    "WorkerRole",
]

MAX_BLOCK_HASH = 2**64 - 1

LiveWorker = tuple[WorkerInfo, WorkerLoadReport | None]


def check_ttl(ttl_s: float) -> None:
    if not ttl_s > 0:
        raise ValueError(f"ttl_s must be > 0, got {ttl_s!r}")


def ttl_to_ms(ttl_s: float) -> int:
    """A validated TTL in whole milliseconds (at least 1), the unit Redis and the wire use."""
    check_ttl(ttl_s)
    return max(1, round(ttl_s * 1000))


def check_block_hashes(hashes: list[int]) -> None:
    if not hashes or (all(map(isinstance, hashes, itertools.repeat(int)))
                      and 0 <= min(hashes) and max(hashes) <= MAX_BLOCK_HASH):
        return  # the common case, checked in C
    for h in hashes:
        if not isinstance(h, int) or not 0 <= h <= MAX_BLOCK_HASH:
            raise ValueError(f"block hash must be an int in [0, 2**64), got {h!r}")


def check_tier(tier: str) -> None:
    if tier not in KV_TIERS:
        raise ValueError(f"tier must be one of {KV_TIERS}, got {tier!r}")


def tiered_run(block_hashes: list[int], holds: Mapping[str, set[int]]) -> PrefixOverlap:
    """The leading run of `block_hashes` held in any tier, each block counted in the
    fastest tier (`KV_TIERS` order) that holds it."""
    counts = dict.fromkeys(KV_TIERS, 0)
    for h in block_hashes:
        tier = next((t for t in KV_TIERS if h in holds.get(t, ())), None)
        if tier is None:
            break
        counts[tier] += 1
    return PrefixOverlap(counts["device"], counts["host"], counts["disk"])


def leading_run(block_hashes: list[int], holds: set[int]) -> int:
    """Length of the longest prefix of `block_hashes` whose every hash is in `holds`."""
    for i, h in enumerate(block_hashes):
        if h not in holds:
            return i
    return len(block_hashes)


class ClusterStore(abc.ABC):
    """Cluster state: worker registry, load, prefix index and request ledger.

    Implementations are safe to call from several threads; methods raise ValueError on
    invalid arguments. The contract is tested once for every backend in tests/cluster/.
    """

    @abc.abstractmethod
    def register_worker(self, info: WorkerInfo, ttl_s: float) -> None:
        """Make `info.worker_id` live for `ttl_s`, replacing any earlier registration.

        Clears the worker's load report and prefix entries: it publishes them afresh.
        """

    @abc.abstractmethod
    def heartbeat(self, worker_id: str, load: WorkerLoadReport | None, ttl_s: float) -> bool:
        """Extend a live worker's TTL to `ttl_s` from now; replace its load unless None.

        Returns False (and changes nothing) when the worker is not live: it must register.
        """

    @abc.abstractmethod
    def deregister_worker(self, worker_id: str) -> None:
        """Remove a worker and its prefix entries now. Unknown ids are ignored."""

    @abc.abstractmethod
    def live_workers(self, role: WorkerRole | None = None) -> list[LiveWorker]:
        """Live workers (with their latest load, or None) sorted by worker_id.

        `role` keeps workers that can play it (`WorkerRole.can_serve`); None keeps all.
        """

    @abc.abstractmethod
    def publish_prefix_events(
        self, worker_id: str, stored_hashes: list[int], evicted_hashes: list[int],
        tier: str = "device",
    ) -> None:
        """Record blocks a worker's prefix cache (or its host or disk `tier`) now holds,
        then those it evicted. Each tier is a set of its own."""

    @abc.abstractmethod
    def prefix_overlap(self, block_hashes: list[int]) -> dict[str, int]:
        """worker_id -> length of the leading run of `block_hashes` the worker holds on
        its device (the prefix cache proper; other tiers are not counted).

        Only live workers with a run of at least one block appear. `block_hashes` are a
        prompt's chained full-block hashes, in order.
        """

    @abc.abstractmethod
    def prefix_overlap_tiers(self, block_hashes: list[int], among: AbstractSet[str] | None = None
                             ) -> dict[str, PrefixOverlap]:
        """worker_id -> its leading run of `block_hashes` held in any tier, each block
        counted in the fastest tier that holds it (`tiered_run`). Only live workers with a
        run of at least one block appear; only those in `among` when given (a caller that
        reads a few workers' runs: the others are not computed)."""

    @abc.abstractmethod
    def ledger_put(self, entry: RequestLedgerEntry) -> None:
        """Insert or replace the entry for `entry.request_id`."""

    @abc.abstractmethod
    def ledger_get(self, request_id: str) -> RequestLedgerEntry | None:
        """The entry for `request_id`, or None."""

    @abc.abstractmethod
    def ledger_delete(self, request_id: str) -> bool:
        """Delete the entry; False when there was none."""

    @abc.abstractmethod
    def ledger_by_worker(self, worker_id: str) -> list[RequestLedgerEntry]:
        """Entries naming `worker_id` as prefill or decode worker, sorted by request_id."""

    @abc.abstractmethod
    def add_service(self, deltas: Mapping[str, float]) -> dict[str, float]:
        """Add each client's fair-share service (weighted tokens, >= 0; router.fairness) to
        the deployment's totals and return every client's total, so that the routers of a
        deployment share one set of counters. Empty `deltas`: only read."""

    def prefix_mirror(self) -> PrefixMirror | None:
        """A copy of the prefix index in this process, for a reader that looks it up on
        every request (the router): its overlap_tiers answers as of its last sync(). None
        where lookups are local already (in-memory) or the backend has no change log."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op for in-process stores
        """Release connections; the store is unusable afterwards."""

    def __enter__(self) -> ClusterStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def check_service_deltas(deltas: Mapping[str, float]) -> None:
    """ValueError unless every delta is a finite number >= 0 for a non-empty client name."""
    for client, delta in deltas.items():
        if not client or not (delta >= 0 and delta != float("inf")):
            raise ValueError(f"service delta of client {client!r} must be finite and >= 0, "
                             f"got {delta}")
