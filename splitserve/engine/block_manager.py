"""KV block allocator with reference counts and a prefix cache of full blocks (pure Python).

Every block is in exactly one of two states:
- referenced (ref_count > 0): in the block table of one or more running sequences;
- free (ref_count == 0): in `_free_queue`, in eviction order (the head is reused first).
A free block may still hold a cached full block (its hash maps to it in `_cached`); it
stays reusable as a prefix hit until it is popped from the head for new tokens, which
evicts it. Sequences free their blocks tail-first, so a prompt's last blocks are evicted
before its first ones (the first ones are the most shareable).

With a KV tier (host memory, disk: engine/kv_tier.py) an evicted cached block is first
offered to the tier (`KVTier.offload`, before its slots are reused), and a prefix lookup
that runs out of device hits continues in the tier: those blocks are loaded into fresh
blocks at allocation and become cached device blocks again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from splitserve.engine.sequence import Sequence


class KVTier(Protocol):
    """Where evicted full blocks go and come back from (engine/kv_tier.py). Keyed by the
    chained block hash; the block manager never sees the bytes."""

    def offload(self, block_id: int, block_hash: int) -> None:
        """Keep block_id's contents under block_hash; called before the block is reused."""

    def contains(self, block_hash: int) -> bool:
        """Whether load() would likely succeed (a disk entry may still turn out corrupt)."""

    def load(self, block_hash: int, block_id: int) -> bool:
        """Copy the block's contents into block_id; False (nothing copied) when the entry is
        gone or fails its checksum."""

    def record_miss(self) -> None:
        """A first allocation's lookup ended at a block no tier holds."""


class PrefixEventLog:
    """Net prefix-cache changes (block hashes stored / evicted) since the last drain().

    A hash evicted and stored again in between cancels out (and vice versa), so the two
    drained lists are disjoint and a consumer may apply them in either order. Not
    thread-safe. Dicts keep insertion order.
    """

    def __init__(self) -> None:
        self._stored: dict[int, None] = {}
        self._evicted: dict[int, None] = {}

    def stored(self, block_hash: int) -> None:
        if self._evicted.pop(block_hash, 0) is not None:
            self._stored[block_hash] = None

    def evicted(self, block_hash: int) -> None:
        if self._stored.pop(block_hash, 0) is not None:
            self._evicted[block_hash] = None

    def merge(self, stored: list[int], evicted: list[int]) -> None:
        """Fold in another log's drained changes (which happened after ours)."""
        for block_hash in evicted:
            self.evicted(block_hash)
        for block_hash in stored:
            self.stored(block_hash)

    def drain(self) -> tuple[list[int], list[int]]:
        stored, evicted = list(self._stored), list(self._evicted)
        self._stored, self._evicted = {}, {}
        return stored, evicted


@dataclass(slots=True)
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, tokens served from the cache (device or KV tier)
    tier_hits: int = 0  # of those, tokens loaded from the KV tier

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


@dataclass(slots=True)
class PrefixMatch:
    """The leading run of a sequence's full blocks held by some cache: cached device blocks
    (`block_ids[i]`), then blocks whose contents are in the KV tier (None, loaded at
    allocation). `hashes[i]` is block i's chained hash."""

    block_ids: list[int | None] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.block_ids)

    @property
    def device_blocks(self) -> list[int]:
        return [b for b in self.block_ids if b is not None]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 tier: KVTier | None = None):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._block_hash: list[int | None] = [None] * num_blocks
        self._free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id
        self.stats = PrefixCacheStats()
        self._events = PrefixEventLog()  # for the cluster's prefix index
        self.tier = tier if enable_prefix_caching else None

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (never used, or cached but unreferenced)."""
        return len(self._free_queue)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, seq: Sequence) -> list[int]:
        """Cached device blocks holding the longest prefix of seq's tokens (no references
        taken; the KV tier is not consulted: see match_prefix)."""
        match = self.match_prefix(seq, use_tier=False)
        return [b for b in match.block_ids if b is not None]

    def match_prefix(self, seq: Sequence, use_tier: bool = True) -> PrefixMatch:
        """The longest prefix of seq's full blocks held on the device or in the KV tier (no
        references taken, nothing loaded).

        At least one token is always left to compute, so the step that finishes the prompt
        has logits to sample from.
        """
        match = PrefixMatch()
        if not self.enable_prefix_caching or seq.block_table:
            return match
        tier = self.tier if use_tier else None
        max_blocks = (seq.num_tokens - 1) // self.block_size
        in_tier = False  # device hits first; once the tier serves a block, only the tier
        for block_hash in seq.block_hashes(self.block_size)[:max_blocks]:
            block_id = None if in_tier else self._cached.get(block_hash)
            if block_id is None:
                if tier is None or not tier.contains(block_hash):
                    break
                in_tier = True
            match.block_ids.append(block_id)
            match.hashes.append(block_hash)
        return match

    # ---- allocation ----------------------------------------------------------------------
    def can_allocate(self, num_new_blocks: int) -> bool:
        return num_new_blocks <= self.num_free_blocks

    def num_revived(self, match: PrefixMatch) -> int:
        """Device hits of `match` that no sequence holds now: they sit in the free queue, so
        taking them uses up free blocks like new ones (allocate_slots counts them so)."""
        return sum(1 for b in match.device_blocks if self._ref_counts[b] == 0)

    def allocate_slots(
        self, seq: Sequence, num_new_tokens: int,
        computed_blocks: PrefixMatch | Iterable[int] = (),
    ) -> bool:
        """Grow seq's block table to hold num_computed_tokens + num_new_tokens slots.

        `computed_blocks` (from match_prefix or get_computed_blocks, first allocation only)
        are prefix hits: device blocks are referenced, tier blocks are loaded into fresh
        blocks, and all count as computed and cached. A tier entry that fails to load ends
        the run there (the sequence computes the rest; its first chunk is just shorter).
        Returns False, changing nothing, when the pool cannot supply the blocks.
        """
        if isinstance(computed_blocks, PrefixMatch):
            match = computed_blocks
        else:
            ids = list(computed_blocks)
            match = PrefixMatch(list(ids), [self._block_hash[b] or 0 for b in ids])
        if match.block_ids and (seq.block_table or seq.num_computed_tokens):
            raise ValueError("computed blocks can only start an empty block table")
        device = match.device_blocks
        num_computed = seq.num_computed_tokens + len(match) * self.block_size
        total = self.blocks_needed(num_computed + num_new_tokens)
        num_new_blocks = max(0, total - len(seq.block_table) - len(device))
        num_revived = self.num_revived(match)
        if num_new_blocks + num_revived > self.num_free_blocks:
            return False
        first = self.enable_prefix_caching and not seq.block_table and not seq.num_computed_tokens
        # Device hits leave the free queue first, so loading tier hits cannot evict them.
        for block_id in device:
            if self._ref_counts[block_id] == 0:
                del self._free_queue[block_id]
            self._ref_counts[block_id] += 1
        num_hits = self._fill_prefix(seq, match)
        if first:
            # A first allocation: count its prefix-cache lookup once (not per blocked retry).
            self.stats.queries += seq.num_tokens
            self.stats.hits += num_hits * self.block_size
            self.stats.tier_hits += max(0, num_hits - len(device)) * self.block_size
            if self.tier is not None and len(match) < (seq.num_tokens - 1) // self.block_size:
                self.tier.record_miss()  # the run ended at a block no tier holds
        if num_hits:
            seq.num_computed_tokens = seq.num_cached_tokens = num_hits * self.block_size
        while len(seq.block_table) < total:
            seq.block_table.append(self._take_free_block())
        return True

    def _fill_prefix(self, seq: Sequence, match: PrefixMatch) -> int:
        """Put match's blocks into seq's (empty) table, loading tier blocks into fresh ones;
        returns how many lead the table as computed (all, unless a load failed)."""
        for index, (block_id, block_hash) in enumerate(
                zip(match.block_ids, match.hashes, strict=True)):
            if block_id is not None:
                seq.block_table.append(block_id)
                continue
            assert self.tier is not None
            fresh = self._take_free_block()
            seq.block_table.append(fresh)
            if self.tier.load(block_hash, fresh) and block_hash not in self._cached:
                self._block_hash[fresh] = block_hash
                self._cached[block_hash] = fresh
                self._events.stored(block_hash)
                continue
            return index  # a failed load: the fresh block stays, to be computed
        return len(match)

    def allocate_blocks(self, num_blocks: int) -> list[int] | None:
        """Fresh blocks outside any sequence (a decode worker reserving for incoming KV)."""
        if num_blocks > self.num_free_blocks:
            return None
        return [self._take_free_block() for _ in range(num_blocks)]

    def _take_free_block(self) -> int:
        block_id, _ = self._free_queue.popitem(last=False)
        block_hash = self._block_hash[block_id]
        if block_hash is not None:
            self._block_hash[block_id] = None
            if self._cached.get(block_hash) == block_id:
                if self.tier is not None:
                    self.tier.offload(block_id, block_hash)  # before the slots are reused
                del self._cached[block_hash]
                self._events.evicted(block_hash)
        self._ref_counts[block_id] = 1
        return block_id

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register seq's full, computed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if num_full == 0:
            return
        hashes = seq.block_hashes(self.block_size)
        for index in range(num_full):
            block_id = seq.block_table[index]
            if self._block_hash[block_id] is not None:
                continue  # already cached (a prefix hit, or registered on an earlier step)
            block_hash = hashes[index]
            if block_hash in self._cached:
                continue  # the same content already lives in another block
            self._block_hash[block_id] = block_hash
            self._cached[block_hash] = block_id
            self._events.stored(block_hash)

    def free(self, seq: Sequence) -> None:
        """Release seq's references, tail first; clears its block table."""
        self.free_blocks(seq.block_table)
        seq.block_table = []

    def free_blocks(self, block_ids: list[int]) -> None:
        for block_id in reversed(block_ids):
            count = self._ref_counts[block_id]
            if count <= 0:
                raise RuntimeError(f"double free of block {block_id}")
            self._ref_counts[block_id] = count - 1
            if count == 1:
                self._free_queue[block_id] = None

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that no sequence references."""
        for block_hash, block_id in list(self._cached.items()):
            if self._ref_counts[block_id] == 0:
                del self._cached[block_hash]
                self._block_hash[block_id] = None
                self._events.evicted(block_hash)

    def drain_events(self) -> tuple[list[int], list[int]]:
        """Net (stored, evicted) block hashes since the last call (see PrefixEventLog)."""
        return self._events.drain()

    # ---- checking ------------------------------------------------------------------------
    def check_invariants(self, block_tables: Iterable[list[int]] = ()) -> None:
        """Raise AssertionError if the allocator's state is inconsistent.

        `block_tables` are every live holder's block lists (sequences and reservations);
        reference counts must equal how often each block appears in them.
        """
        expected = [0] * self.num_blocks
        for table in block_tables:
            for block_id in table:
                expected[block_id] += 1
        for block_id in range(self.num_blocks):
            count = self._ref_counts[block_id]
            assert count == expected[block_id], (
                f"block {block_id}: ref_count {count} but held {expected[block_id]} times"
            )
            assert (count == 0) == (block_id in self._free_queue), (
                f"block {block_id}: ref_count {count} disagrees with free-queue membership"
            )
        for block_hash, block_id in self._cached.items():
            assert self._block_hash[block_id] == block_hash, f"cache map stale for {block_id}"
        assert len(self._free_queue) + sum(1 for c in self._ref_counts if c) == self.num_blocks
