"""The prefix index in memory: block hash -> workers holding it, per KV tier.

Shared by the in-memory store (its index) and the router's mirror of a Redis store's index
(cluster.prefix_mirror). Not thread-safe: its owner locks.

A prompt's overlap with the workers' caches is read block by block over sets of worker
ids, never worker by worker: the workers whose run is still unbroken (`running`) are
intersected with each block's holders. On the device tier (the common lookup) the sets are
bitmasks: each worker the index knows has a slot, each block hash the int whose bits are the
slots of its holders, and a lookup's scope the same (a frozenset's mask is cached), so a
block costs one AND of two ints and a worker whose run ends one bit lookup. A tier other than
the device is read with Python sets, and costs only where some worker holds the block there.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet

from splitserve.common.cluster_types import KV_TIERS, PrefixOverlap, WorkerIdUnion, ids_within

_NONE: frozenset[str] = frozenset()
_SCOPE_CACHE_SIZE = 8  # frozenset scopes whose masks are kept (a router has one or two)


class PrefixIndex:
    def __init__(self) -> None:
        # tier -> block hash -> ids of the workers holding it there
        self._holders: dict[str, dict[int, set[str]]] = {t: {} for t in KV_TIERS}
        # worker id -> tier -> the block hashes it holds there
        self._held: dict[str, dict[str, set[int]]] = {}
        # The device tier again, as bitmasks: block hash -> OR of its holders' bits
        self._device_masks: dict[int, int] = {}
        self._bit: dict[str, int] = {}  # worker id -> 1 << its slot
        self._slot_ids: list[str | None] = []  # slot -> worker id (None: free)
        self._free_slots: list[int] = []
        self._slots_version = 0  # bumped whenever a slot gets a worker: cached masks expire
        # id(frozenset) -> (the frozenset, _slots_version then, its mask)
        self._scope_masks: dict[int, tuple[frozenset[str], int, int]] = {}

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
        if worker_id not in self._held:
            self._held[worker_id] = {t: set() for t in KV_TIERS}
            self._take_slot(worker_id)
        held = self._held[worker_id][tier]
        holders = self._holders[tier]
        for h in stored:
            held.add(h)
            holders.setdefault(h, set()).add(worker_id)
        if tier == "device":
            masks, bit = self._device_masks, self._bit[worker_id]
            for h in stored:
                masks[h] = masks.get(h, 0) | bit
        for h in evicted:
            held.discard(h)
            self._discard(tier, h, worker_id)

    def drop(self, worker_id: str) -> None:
        """Forget everything `worker_id` holds. Unknown ids are ignored."""
        for tier, hashes in self._held.pop(worker_id, {}).items():
            for h in hashes:
                self._discard(tier, h, worker_id)
        bit = self._bit.pop(worker_id, 0)
        if bit:
            slot = bit.bit_length() - 1
            self._slot_ids[slot] = None
            self._free_slots.append(slot)

    def _take_slot(self, worker_id: str) -> None:
        if self._free_slots:
            slot = self._free_slots.pop()
            self._slot_ids[slot] = worker_id
        else:
            slot = len(self._slot_ids)
            self._slot_ids.append(worker_id)
        self._bit[worker_id] = 1 << slot
        self._slots_version += 1

    def _discard(self, tier: str, block_hash: int, worker_id: str) -> None:
        holders = self._holders[tier].get(block_hash)
        if holders is not None:
            holders.discard(worker_id)
            if not holders:
                del self._holders[tier][block_hash]
        if tier == "device":
            mask = self._device_masks.get(block_hash, 0) & ~self._bit[worker_id]
            if mask:
                self._device_masks[block_hash] = mask
            else:
                self._device_masks.pop(block_hash, None)

    def overlap(self, block_hashes: list[int], among: AbstractSet[str] | None = None
                ) -> dict[str, int]:
        """worker_id -> its leading run of `block_hashes` on its device (>= 1 block), sorted
        by worker_id; only workers in `among` when given (store.ClusterStore.prefix_overlap)."""
        ends = self._device_ends(block_hashes, among)
        return {wid: ends[wid] for wid in sorted(ends)}

    def _device_ends(self, block_hashes: list[int], among: AbstractSet[str] | None
                     ) -> dict[str, int]:
        ends: dict[str, int] = {}
        if not block_hashes:
            return ends
        masks = self._device_masks
        running = masks.get(block_hashes[0], 0)
        if running and among is not None:
            running &= self._scope_mask(among, block_hashes[0])
        if not running:
            return ends
        ids = self._slot_ids
        i = 1
        for i in range(1, len(block_hashes)):
            kept = running & masks.get(block_hashes[i], 0)
            if kept != running:
                _add_ends(ends, ids, running ^ kept, i)
                running = kept
                if not running:
                    return ends
        else:
            i = len(block_hashes)
        _add_ends(ends, ids, running, i)
        return ends

    def _scope_mask(self, among: AbstractSet[str], first_block: int) -> int:
        """The bits of the workers in `among` (at least of those holding `first_block`)."""
        if isinstance(among, WorkerIdUnion):
            mask = 0
            for part in among.parts:
                mask |= self._scope_mask(part, first_block)
            return mask
        if isinstance(among, frozenset):
            cached = self._scope_masks.get(id(among))
            if cached is not None and cached[0] is among and cached[1] == self._slots_version:
                return cached[2]
            mask = self._mask_of(among)
            if len(self._scope_masks) >= _SCOPE_CACHE_SIZE:
                del self._scope_masks[next(iter(self._scope_masks))]
            self._scope_masks[id(among)] = (among, self._slots_version, mask)
            return mask
        # Another set may change between lookups: only the first block's holders matter.
        return self._mask_of(ids_within(self._holders["device"].get(first_block, set()), among))

    def _mask_of(self, worker_ids: AbstractSet[str]) -> int:
        bit = self._bit
        mask = 0
        for wid in worker_ids:
            mask |= bit.get(wid, 0)
        return mask

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


def _add_ends(ends: dict[str, int], slot_ids: list[str | None], bits: int, end: int) -> None:
    """ends[worker] = end for each worker whose slot's bit is set in `bits`."""
    while bits:
        slot = bits.bit_length() - 1
        ends[slot_ids[slot]] = end  # type: ignore[index]  # a set bit's slot is taken
        bits ^= 1 << slot


_DEVICE_RUNS: list[PrefixOverlap] = []


def _device_runs(longest: int) -> list[PrefixOverlap]:
    """[PrefixOverlap(n, 0, 0) for n in 0..longest (at least)], shared frozen objects."""
    while len(_DEVICE_RUNS) <= longest:
        _DEVICE_RUNS.append(PrefixOverlap(len(_DEVICE_RUNS)))
    return _DEVICE_RUNS
