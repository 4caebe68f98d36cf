"""A router's copy of a Redis store's prefix index, kept current from the store's prefix log.

The router looks up the prefix index for every request; over Redis that was a pipeline of
one SMEMBERS per block and tier plus an EXISTS per worker, far slower than the routing
decision. RedisClusterStore appends every change of the prefix sets to a stream
({ns}prefix_log) in the script that makes it, each entry numbered from a counter
({ns}prefix_seq). `PrefixMirror.sync()` (the router calls it with each read of the live
workers, every `worker_refresh_s`) applies the entries after the last one it applied to a
PrefixIndex in this process, which answers the lookups.

When an entry's number is not the next one (the stream was trimmed past what this mirror
read, or Redis restarted and counts from 1 again), and before the first sync, it reloads:
notes the last entry's number and id, reads every worker's prefix sets into a fresh index,
then applies the entries after the noted one. Entries older than a set's read are applied
again; that changes nothing, because an entry leaves a block's membership as it was after
that entry, and the entries come in order.

The mirror answers for workers whose sets exist: a worker whose registration expired
stays until a reader purges it (its drop entry), so the caller keeps only workers it sees
live (the router looks up workers by id in its view of the live workers).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from typing import Protocol

from splitserve.cluster.prefix_index import PrefixIndex
from splitserve.cluster.store import PrefixOverlap

_READ_COUNT = 10_000  # log entries per read

LogEntry = tuple[str, dict[str, str]]  # (stream id, fields)


class PrefixLog(Protocol):
    """Where a mirror reads from (RedisClusterStore)."""

    def prefix_log_after(self, entry_id: str, count: int) -> list[LogEntry]:
        """Up to `count` prefix log entries after `entry_id` ("0-0": from the first)."""
        ...

    def prefix_sets(self) -> tuple[int, str, dict[str, dict[str, set[int]]]]:
        """The number and id of the log's last entry ("0-0" if none), then every worker's
        held hashes per tier, read after them."""
        ...


class PrefixMirror:
    def __init__(self, log: PrefixLog) -> None:
        self._log = log
        self._lock = threading.Lock()  # sync() runs on a worker thread, lookups on the loop's
        self._index = PrefixIndex()
        self._seq = -1  # number of the last entry applied; -1: never loaded
        self._last_id = "0-0"
        self.num_reloads = 0

    def overlap_tiers(self, block_hashes: list[int], among: AbstractSet[str] | None = None
                      ) -> dict[str, PrefixOverlap]:
        """store.prefix_overlap_tiers as of the last sync (dropped workers left out)."""
        with self._lock:
            return self._index.overlap_tiers(block_hashes, among)

    def weighted_runs(self, block_hashes: list[int], among: AbstractSet[str] | None,
                      host_weight: float, disk_weight: float) -> Mapping[str, float]:
        """PrefixIndex.weighted_runs as of the last sync."""
        with self._lock:
            return self._index.weighted_runs(block_hashes, among, host_weight, disk_weight)

    def sync(self) -> int:
        """Apply the log's new entries (reloading when some were missed); returns how many."""
        reloads = 0
        if self._seq < 0:
            self._reload()
            reloads += 1
        applied = 0
        while True:
            entries = self._log.prefix_log_after(self._last_id, _READ_COUNT)
            for entry_id, fields in entries:
                if int(fields["n"]) != self._seq + 1:  # missed some, or the store restarted
                    if reloads:
                        return applied  # twice in one sync: the log churns; next time
                    self._reload()
                    reloads += 1
                    break
                with self._lock:
                    _apply(self._index, fields)
                self._seq, self._last_id = self._seq + 1, entry_id
                applied += 1
            else:
                if len(entries) < _READ_COUNT:
                    return applied

    def _reload(self) -> None:
        seq, last_id, held = self._log.prefix_sets()
        index = PrefixIndex()
        for wid, tiers in held.items():
            for tier, hashes in tiers.items():
                if hashes:
                    index.apply(wid, tier, list(hashes), [])
        with self._lock:
            self._index = index
        self._seq, self._last_id = seq, last_id
        self.num_reloads += 1


def _apply(index: PrefixIndex, fields: dict[str, str]) -> None:
    """One prefix_log entry."""
    if "drop" in fields:
        index.drop(fields["w"])
        return
    index.apply(fields["w"], fields["t"], [int(h) for h in fields["s"].split()],
                [int(h) for h in fields["e"].split()])
