"""The prefix index in memory: block hash -> workers holding it, per KV tier.

Shared by the in-memory store (its index) and the router's mirror of a Redis store's index
(cluster.prefix_mirror). Not thread-safe: its owner locks.

Sets of workers are bitmasks: each worker the index knows has a slot (freed when it is
dropped, then reused), and each block hash of a tier maps to the int whose bits are the
slots of the workers holding it there. A prompt's overlap with the workers' caches is read
block by block, never worker by worker: the workers whose run is still unbroken
(`running`, a mask; the lookup's scope applied to it once, a frozenset scope's mask cached)
are ANDed with each block's holders, so a block costs an AND of two ints, a worker whose run
ends one bit lookup, and a tier other than the device costs only where some worker holds
the block there. The device lookup, the one the router makes for every request, is in C
where setup.py built it (cluster/_prefix_runs.c: the same dict), else the Python loop.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from collections.abc import Set as AbstractSet

from splitserve.common.cluster_types import KV_TIERS, PrefixOverlap, WorkerIdUnion

try:  # the device lookup in C (setup.py builds it; optional)
    from splitserve.cluster import _prefix_runs  # type: ignore[attr-defined]
except ImportError:  # not built: the Python loop
    _prefix_runs = None



def has_compiled_lookup() -> bool:
    """Whether this install has the device lookup in C (setup.py builds it; optional)."""
    return _prefix_runs is not None


_SCOPE_CACHE_SIZE = 8  # frozenset scopes whose masks are kept (a router has one or two)


class PrefixIndex:
    def __init__(self) -> None:
        # tier -> block hash -> the bits of the workers holding it there (never 0)
        self._masks: dict[str, dict[int, int]] = {t: {} for t in KV_TIERS}
        # worker id -> tier -> the block hashes it holds there
        self._held: dict[str, dict[str, set[int]]] = {}
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
        masks, bit = self._masks[tier], self._bit[worker_id]
        for h in stored:
            held.add(h)
            masks[h] = masks.get(h, 0) | bit
        for h in evicted:
            held.discard(h)
            _discard(masks, h, bit)

    def drop(self, worker_id: str) -> None:
        """Forget everything `worker_id` holds. Unknown ids are ignored."""
        held = self._held.pop(worker_id, None)
        if held is None:
            return
        bit = self._bit.pop(worker_id)
        for tier, hashes in held.items():
            masks = self._masks[tier]
            for h in hashes:
                _discard(masks, h, bit)
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

    def overlap(self, block_hashes: list[int], among: AbstractSet[str] | None = None
                ) -> dict[str, int]:
        """worker_id -> its leading run of `block_hashes` on its device (>= 1 block), sorted
        by worker_id; only workers in `among` when given (store.ClusterStore.prefix_overlap)."""
        ends = self._device_ends(block_hashes, among)
        return {wid: ends[wid] for wid in sorted(ends)}

    def weighted_runs(self, block_hashes: list[int], among: AbstractSet[str] | None,
                      host_weight: float, disk_weight: float) -> Mapping[str, float]:
        """worker_id -> its leading run of `block_hashes` in device-block equivalents: a
        block counted in the host (disk) tier weighs `host_weight` (`disk_weight`), one in
        the device 1 (router.policy.weighted_overlap of overlap_tiers, the same values), in
        no particular order; only workers in `among` when given. Where no worker has a host
        or disk tier, the runs' lengths as they are read: no PrefixOverlap per worker, no
        sort, no second dict (the router reads this for every request)."""
        if not self._masks["host"] and not self._masks["disk"]:
            return self._device_ends(block_hashes, among)
        return {wid: run.weighted(host_weight, disk_weight)
                for wid, run in self.overlap_tiers(block_hashes, among).items()}

    def _device_ends(self, block_hashes: list[int], among: AbstractSet[str] | None
                     ) -> dict[str, int]:
        """worker_id -> the end of its leading run of `block_hashes` on its device (the index
        of the first block it lacks), for the workers in `among` holding the first block; by
        end, then by slot from the highest."""
        if not block_hashes:
            return {}
        masks = self._masks["device"]
        running = self._scoped(masks.get(block_hashes[0], 0), among)
        if _prefix_runs is not None:
            return _prefix_runs.device_ends(masks, block_hashes, running,  # type: ignore[no-any-return]
                                            self._slot_ids)
        return device_ends(masks, block_hashes, running, self._slot_ids)

    def overlap_tiers(self, block_hashes: list[int], among: AbstractSet[str] | None = None
                      ) -> dict[str, PrefixOverlap]:
        """worker_id -> its leading run of `block_hashes` held in any tier, each block
        counted in the fastest tier that holds it (store.tiered_run), sorted by worker_id;
        only workers in `among` when given."""
        device, host, disk = (self._masks[t] for t in KV_TIERS)
        if not host and not disk:  # no worker has a host or disk tier
            device_ends = self._device_ends(block_hashes, among)
            runs = _device_runs(len(block_hashes))
            return {wid: runs[device_ends[wid]] for wid in sorted(device_ends)}
        if not block_hashes:
            return {}
        first = block_hashes[0]
        running = self._scoped(
            device.get(first, 0) | host.get(first, 0) | disk.get(first, 0), among)
        ends: dict[str, int] = {}
        slower: dict[str, list[int]] = {}  # worker -> [host blocks, disk blocks] in its run
        ids = self._slot_ids
        for i, h in enumerate(block_hashes):
            if not running:
                break
            held = running & device.get(h, 0)
            for tier, masks in enumerate((host, disk)):
                if held == running:
                    break
                found = running & masks.get(h, 0) & ~held
                if found:
                    for wid in _ids_of(ids, found):
                        slower.setdefault(wid, [0, 0])[tier] += 1
                    held |= found
            if held != running:
                _add_ends(ends, ids, running ^ held, i)
                running = held
        _add_ends(ends, ids, running, len(block_hashes))
        result = {}
        for wid in sorted(ends):
            n_host, n_disk = slower.get(wid, (0, 0))
            result[wid] = PrefixOverlap(ends[wid] - n_host - n_disk, n_host, n_disk)
        return result

    def _scoped(self, bits: int, among: AbstractSet[str] | None) -> int:
        """`bits` less the workers not in `among` (None: everyone)."""
        if not bits or among is None:
            return bits
        return bits & self._scope_mask(among, bits)

    def _scope_mask(self, among: AbstractSet[str], candidates: int) -> int:
        """The bits of the workers in `among`, at least of those among `candidates`' bits."""
        if isinstance(among, WorkerIdUnion):
            mask = 0
            for part in among.parts:
                mask |= self._scope_mask(part, candidates)
            return mask
        if isinstance(among, frozenset):
            cached = self._scope_masks.get(id(among))
            if cached is not None and cached[0] is among and cached[1] == self._slots_version:
                return cached[2]
            bit = self._bit
            mask = 0
            for wid in among:
                mask |= bit.get(wid, 0)
            if len(self._scope_masks) >= _SCOPE_CACHE_SIZE:
                del self._scope_masks[next(iter(self._scope_masks))]
            self._scope_masks[id(among)] = (among, self._slots_version, mask)
            return mask
        # Any other set may change between lookups: read it afresh, or (when it is the
        # larger) ask it about the candidates only.
        bit = self._bit
        mask = 0
        if len(among) <= candidates.bit_count():
            for wid in among:
                mask |= bit.get(wid, 0)
        else:
            for wid in _ids_of(self._slot_ids, candidates):
                if wid in among:
                    mask |= bit[wid]
        return mask


def device_ends(masks: Mapping[int, int], block_hashes: list[int], running: int,
                slot_ids: list[str | None]) -> dict[str, int]:
    """PrefixIndex._device_ends from its scoped first block's bits `running`, in Python (the
    reference of cluster/_prefix_runs.c, and the path where that is not built)."""
    ends: dict[str, int] = {}
    for i in range(1, len(block_hashes)):
        if not running:
            return ends
        kept = running & masks.get(block_hashes[i], 0)
        if kept != running:
            gone = running ^ kept  # _add_ends(ends, slot_ids, gone, i), without the call
            while gone:
                slot = gone.bit_length() - 1
                ends[slot_ids[slot]] = i  # type: ignore[index]
                gone ^= 1 << slot
            running = kept
    _add_ends(ends, slot_ids, running, len(block_hashes))
    return ends


def _discard(masks: dict[int, int], block_hash: int, bit: int) -> None:
    mask = masks.get(block_hash, 0) & ~bit
    if mask:
        masks[block_hash] = mask
    else:
        masks.pop(block_hash, None)


def _ids_of(slot_ids: list[str | None], bits: int) -> Iterator[str]:
    """The workers whose slots' bits are set in `bits` (every set bit's slot is taken)."""
    while bits:
        slot = bits.bit_length() - 1
        yield slot_ids[slot]  # type: ignore[misc]
        bits ^= 1 << slot


def _add_ends(ends: dict[str, int], slot_ids: list[str | None], bits: int, end: int) -> None:
    """ends[worker] = end for each worker whose slot's bit is set in `bits`. (_ids_of's loop
    written out: through the generator a device lookup took ~1.6x as long.)"""
    while bits:
        slot = bits.bit_length() - 1
        ends[slot_ids[slot]] = end  # type: ignore[index]
        bits ^= 1 << slot


_DEVICE_RUNS: list[PrefixOverlap] = []


def _device_runs(longest: int) -> list[PrefixOverlap]:
    """[PrefixOverlap(n, 0, 0) for n in 0..longest (at least)], shared frozen objects."""
    while len(_DEVICE_RUNS) <= longest:
        _DEVICE_RUNS.append(PrefixOverlap(len(_DEVICE_RUNS)))
    return _DEVICE_RUNS
