"""The prefix index in memory: block hash -> workers holding it, per KV tier.

Shared by the in-memory store (its index) and the router's mirror of a Redis store's index
(cluster.prefix_mirror). Not thread-safe: its owner locks.

A prompt's overlap with the workers' caches is read block by block over sets of worker
ids, never worker by worker: the workers whose run is still unbroken (`running`) are
intersected with each block's holders, so one lookup costs O(blocks x holders of the first
block) in C set operations, and a tier other than the device costs only where some worker
holds the block there.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet

from splitserve.common.cluster_types import KV_TIERS, PrefixOverlap, ids_within

_NONE: frozenset[str] = frozenset()


class PrefixIndex:
    def __init__(self) -> None:
        # tier -> block hash -> ids of the workers holding it there
        self._holders: dict[str, dict[int, set[str]]] = {t: {} for t in KV_TIERS}
        # worker id -> tier -> the block hashes it holds there
        self._held: dict[str, dict[str, set[int]]] = {}

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._held

    def workers(self) -> list[str]:
        """Ids of the workers holding at least one block (or not dropped since they did)."""
        return list(self._held)

    def held(self, worker_id: str, tier: str = "device") -> set[int]:
        """The block hashes `worker_id` holds in `tier` (a copy)."""
        return set(self._held.get(worker_id, {}).get(tier, ()))

    def apply(self, worker_id: str, tier: str, stored: list[int], evicted: list[int]) -> None:
        """`worker_id` now holds `stored` in `tier`, then no longer `evicted`."""
        held = self._held.setdefault(worker_id, {t: set() for t in KV_TIERS})[tier]
        holders = self._holders[tier]
        for h in stored:
            held.add(h)
            holders.setdefault(h, set()).add(worker_id)
        for h in evicted:
            held.discard(h)
            self._discard(tier, h, worker_id)

    def drop(self, worker_id: str) -> None:
        """Forget everything `worker_id` holds. Unknown ids are ignored."""
        for tier, hashes in self._held.pop(worker_id, {}).items():
            for h in hashes:
                self._discard(tier, h, worker_id)

    def _discard(self, tier: str, block_hash: int, worker_id: str) -> None:
        holders = self._holders[tier].get(block_hash)
        if holders is not None:
            holders.discard(worker_id)
            if not holders:
                del self._holders[tier][block_hash]

    def overlap(self, block_hashes: list[int], among: AbstractSet[str] | None = None
                ) -> dict[str, int]:
        """worker_id -> its leading run of `block_hashes` on its device (>= 1 block), sorted
        by worker_id; only workers in `among` when given (store.ClusterStore.prefix_overlap)."""
        ends = self._device_ends(block_hashes, among)
        return {wid: ends[wid] for wid in sorted(ends)}

    def _device_ends(self, block_hashes: list[int], among: AbstractSet[str] | None
                     ) -> dict[str, int]:
        per_block = list(map(self._holders["device"].get, block_hashes))
        running = set(per_block[0] or ()) if per_block else set()
        if among is not None:
            running = ids_within(running, among)
        ends: dict[str, int] = {}
        if not running:
            return ends
        for i, holders in enumerate(per_block):
            if holders is None:  # nobody holds it: every run ends here
                break
            ended = running - holders
            if ended:
                ends.update(dict.fromkeys(ended, i))
                running -= ended
                if not running:
                    return ends
        else:
            i = len(per_block)
        ends.update(dict.fromkeys(running, i))
        return ends

    def overlap_tiers(self, block_hashes: list[int], among: AbstractSet[str] | None = None
                      ) -> dict[str, PrefixOverlap]:
        """worker_id -> its leading run of `block_hashes` held in any tier, each block
        counted in the fastest tier that holds it (store.tiered_run), sorted by worker_id;
        only workers in `among` when given."""
        device, host, disk = (self._holders[t] for t in KV_TIERS)
        if not host and not disk:  # no worker has a host or disk tier
            device_ends = self._device_ends(block_hashes, among)
            runs = _device_runs(len(block_hashes))
            return {wid: runs[device_ends[wid]] for wid in sorted(device_ends)}
        if not block_hashes:
            return {}
        first = block_hashes[0]
        running = set().union(device.get(first, _NONE), host.get(first, _NONE),
                              disk.get(first, _NONE))
        if among is not None:
            running = ids_within(running, among)
        if not running:
            return {}
        ends: dict[str, int] = {}
        slower: dict[str, list[int]] = {}  # worker -> [host blocks, disk blocks] in its run
        for i, h in enumerate(block_hashes):
            held = running & device.get(h, _NONE)
            for tier, holders in ((0, host.get(h)), (1, disk.get(h))):
                if holders and len(held) != len(running):
                    found = (running & holders) - held
                    for wid in found:
                        slower.setdefault(wid, [0, 0])[tier] += 1
                    held |= found
            if len(held) != len(running):
                for wid in running - held:
                    ends[wid] = i
                running = held
                if not running:
                    break
        for wid in running:
            ends[wid] = len(block_hashes)
        result = {}
        for wid in sorted(ends):
            n_host, n_disk = slower.get(wid, (0, 0))
            result[wid] = PrefixOverlap(ends[wid] - n_host - n_disk, n_host, n_disk)
        return result


_DEVICE_RUNS: list[PrefixOverlap] = []


def _device_runs(longest: int) -> list[PrefixOverlap]:
    """[PrefixOverlap(n, 0, 0) for n in 0..longest (at least)], shared frozen objects."""
    while len(_DEVICE_RUNS) <= longest:
        _DEVICE_RUNS.append(PrefixOverlap(len(_DEVICE_RUNS)))
    return _DEVICE_RUNS
