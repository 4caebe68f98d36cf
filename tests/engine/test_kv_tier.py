"""The KV tiers below the device pool (engine/kv_tier.py, engine/kv_disk.py): the block
manager's hooks with exact block ids, host LRU under a byte budget, disk entries that are
damaged or truncated never loaded, evicted blocks reloaded bit-exact, and greedy tokens
through the engine equal with the tier on and off when a tiny pool forces eviction."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from splitserve.common.sampling_params import SamplingParams
from splitserve.engine.block_hash import compute_block_hashes
from splitserve.engine.block_manager import BlockManager, PrefixMatch
from splitserve.engine.config import EngineConfig
from splitserve.engine.kv_disk import DiskKVStore
from splitserve.engine.kv_tier import KVTierStore, build_kv_tier
from splitserve.engine.sequence import Sequence
from splitserve.llm import LLM

PARAMS = SamplingParams()


class FakeTier:
    """A dict tier recording what the block manager asked of it."""

    def __init__(self) -> None:
        self.blocks: dict[int, int] = {}  # block hash -> block id it was evicted from
        self.loads: list[tuple[int, int]] = []  # (block hash, into block id)
        self.broken: set[int] = set()  # hashes whose load fails (a damaged disk entry)
        self.misses = 0

    def offload(self, block_id: int, block_hash: int) -> None:
        self.blocks[block_hash] = block_id

    def contains(self, block_hash: int) -> bool:
        return block_hash in self.blocks

    def load(self, block_hash: int, block_id: int) -> bool:
        if block_hash in self.broken:
            return False
        self.loads.append((block_hash, block_id))
        return True

    def record_miss(self) -> None:
        self.misses += 1


def run(bm: BlockManager, seq: Sequence) -> None:
    """Admit seq like the scheduler does, compute its prompt, cache and free it."""
    match = bm.match_prefix(seq)
    num_cached = len(match) * bm.block_size
    assert bm.allocate_slots(seq, seq.num_tokens - num_cached, match)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)
    bm.free(seq)


def test_evicted_blocks_go_to_the_tier_and_come_back_into_fresh_blocks() -> None:
    tier = FakeTier()
    bm = BlockManager(num_blocks=4, block_size=4, tier=tier)
    a = list(range(1, 13))  # 3 full blocks
    run(bm, Sequence("a", a + [99], PARAMS))  # blocks 0, 1, 2 (cached), 3
    hashes = compute_block_hashes(a, 4)
    run(bm, Sequence("b", [50 + i for i in range(13)], PARAMS))  # evicts a's blocks
    # Freed tail-first, a's blocks went in the order 2, 1, 0 (block 3 was never cached).
    assert tier.blocks == {hashes[2]: 2, hashes[1]: 1, hashes[0]: 0}
    c = Sequence("c", a + [7, 8], PARAMS)
    match = bm.match_prefix(c)
    assert match.block_ids == [None, None, None] and match.hashes == hashes
    assert bm.get_computed_blocks(c) == []  # the device alone holds none of it
    assert bm.allocate_slots(c, 2, match)
    assert c.num_computed_tokens == c.num_cached_tokens == 12
    assert [h for h, _ in tier.loads] == hashes
    assert c.block_table[:3] == [b for _, b in tier.loads]
    assert bm.stats.tier_hits == 12 and bm.stats.hits == 12
    bm.check_invariants([c.block_table])
    # Loaded blocks are cached device blocks again: the next prompt hits them on device.
    c.num_computed_tokens = c.num_tokens
    bm.cache_full_blocks(c)
    d = Sequence("d", a + [1], PARAMS)
    assert bm.match_prefix(d).block_ids == c.block_table[:3]


def test_device_hits_then_tier_hits_and_a_failed_load_ends_the_run() -> None:
    tier = FakeTier()
    bm = BlockManager(num_blocks=6, block_size=2, tier=tier)
    prompt = list(range(1, 9))  # 4 full blocks
    hashes = compute_block_hashes(prompt, 2)
    tier.blocks = {hashes[2]: -1, hashes[3]: -1}
    run(bm, Sequence("a", prompt[:4] + [0], PARAMS))  # device caches blocks 0 and 1
    seq = Sequence("b", prompt + [0], PARAMS)
    match = bm.match_prefix(seq)
    assert match.block_ids == [0, 1, None, None]
    tier.broken = {hashes[3]}
    assert bm.allocate_slots(seq, 1, match)
    # Block 3's load failed: 3 blocks count as cached, the 4th is computed like any other.
    assert seq.num_cached_tokens == seq.num_computed_tokens == 6
    assert seq.block_table[:2] == [0, 1] and len(seq.block_table) == 5  # 9 slots
    assert bm.stats.hits == 6 and bm.stats.tier_hits == 2
    assert tier.misses == 1  # a's lookup; a failed load is the tier's to count
    bm.check_invariants([seq.block_table])


def test_without_a_tier_nothing_changes() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    run(bm, Sequence("a", list(range(13)), PARAMS))
    run(bm, Sequence("b", [50 + i for i in range(13)], PARAMS))
    assert len(bm.match_prefix(Sequence("c", list(range(14)), PARAMS))) == 0
    assert PrefixMatch().device_blocks == []


# ---- the host and disk tiers on tensors --------------------------------------------------

SHAPE = (3, 2, 5, 4, 2, 8)  # [layers, 2, num_blocks, block_size, kv_heads, head_dim]


def pool() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


def test_host_tier_reloads_exact_contents_and_is_lru_within_its_budget() -> None:
    kv = pool()
    original = kv.clone()
    block_bytes = kv[:, :, 0].numel() * 4
    tier = KVTierStore(kv, host_capacity_bytes=2 * block_bytes + block_bytes // 2)
    assert tier.max_host_blocks == 2
    tier.offload(0, 100)
    tier.offload(1, 101)
    assert tier.contains(100)  # a lookup makes 100 the most recently used
    tier.offload(2, 102)  # over budget: 101 goes
    assert not tier.contains(101) and tier.contains(100) and tier.contains(102)
    assert tier.host_bytes == 2 * block_bytes <= tier.host_capacity_bytes
    kv[:, :, 0].zero_()
    kv[:, :, 4].zero_()
    assert tier.load(100, 4) and tier.load(102, 0)
    assert torch.equal(kv[:, :, 4], original[:, :, 0])
    assert torch.equal(kv[:, :, 0], original[:, :, 2])
    assert not tier.load(101, 3)
    host = tier.stats["host"]
    assert (host.hits, host.misses, host.stored, host.evicted) == (2, 1, 3, 1)
    assert host.bytes_loaded == 2 * block_bytes and host.bytes_stored == 3 * block_bytes
    assert tier.drain_events() == {"host": ([100, 102], [])}


def test_an_offload_of_a_block_the_tier_holds_copies_nothing() -> None:
    kv = pool()
    tier = KVTierStore(kv, host_capacity_bytes=1 << 20)
    tier.offload(0, 7)
    tier.offload(3, 7)  # same hash, same contents (chained hashes): kept, not copied
    assert tier.stats["host"].stored == 1


def disk_store(folder: Path, capacity_blocks: int = 4, layout: str = "test") -> DiskKVStore:
    shape = (SHAPE[0], SHAPE[1], *SHAPE[3:])
    probe = DiskKVStore(folder, layout, shape, torch.float32, 1 << 30)
    return DiskKVStore(folder, layout, shape, torch.float32, capacity_blocks * probe.entry_bytes)


def test_disk_entries_reload_exactly_and_survive_a_restart(tmp_path: Path) -> None:
    kv = pool()
    store = disk_store(tmp_path)
    for i in range(3):
        assert store.put(1000 + i, kv[:, :, i])
    again = disk_store(tmp_path)
    assert again.num_entries == 3
    for i in range(3):
        got = again.get(1000 + i)
        assert got is not None and torch.equal(got, kv[:, :, i])
    assert disk_store(tmp_path, layout="another model").num_entries == 0


def test_a_disk_entry_of_the_model_in_another_dtype_is_never_loaded(tiny_llama: Path,
                                                                      tmp_path: Path) -> None:
    # A bf16 model's own (bf16) cache and an fp32 model's bf16 cache hold bytes of one
    # layout, but not the same K/V: each finds only its own entries.
    def disk(dtype: str, kv_cache_dtype: str) -> DiskKVStore:
        config = EngineConfig(model=str(tiny_llama), dtype=dtype, kv_cache_dtype=kv_cache_dtype,
                              disk_kv_cache_dir=str(tmp_path))
        built = build_kv_tier(config, pool().to(torch.bfloat16), str(tiny_llama))
        assert built is not None and built.disk is not None
        return built.disk

    assert disk("bfloat16", "auto").put(7, pool()[:, :, 0].bfloat16())
    assert disk("bfloat16", "auto").num_entries == 1
    assert disk("float32", "bfloat16").num_entries == 0


def test_disk_tier_is_lru_within_its_byte_budget(tmp_path: Path) -> None:
    kv = pool()
    store = disk_store(tmp_path, capacity_blocks=2)
    store.put(1, kv[:, :, 0])
    store.put(2, kv[:, :, 1])
    assert store.contains(1)  # 1 is now the most recent
    store.put(3, kv[:, :, 2])
    assert not store.contains(2) and store.contains(1) and store.contains(3)
    assert store.used_bytes <= store.capacity_bytes
    assert sorted(p.name for p in store.dir.iterdir()) == [f"{1:016x}.kvb", f"{3:016x}.kvb"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "wrong_hash"])
def test_a_damaged_disk_entry_is_never_loaded(tmp_path: Path, damage: str) -> None:
    kv = pool()
    store = disk_store(tmp_path)
    store.put(5, kv[:, :, 1])
    path = store.dir / f"{5:016x}.kvb"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-3] ^= 0x10
    elif damage == "truncate":
        data = data[: len(data) - 7]
    elif damage == "empty":
        data = bytearray()
    else:  # another block's (valid) file under this name
        store.put(6, kv[:, :, 2])
        data = bytearray((store.dir / f"{6:016x}.kvb").read_bytes())
    path.write_bytes(bytes(data))
    assert store.get(5) is None
    assert store.corrupt == 1 and not path.exists() and not store.contains(5)
    # Through the tier: the lookup fails, the device block is left as it was.
    tier = KVTierStore(kv, host_capacity_bytes=0, disk=store)
    store.put(9, kv[:, :, 0])
    (store.dir / f"{9:016x}.kvb").write_bytes(b"garbage")
    before = kv[:, :, 3].clone()
    assert tier.contains(9) and not tier.load(9, 3)
    assert torch.equal(kv[:, :, 3], before)
    assert tier.stats["disk"].corrupt == 2 and tier.stats["disk"].misses == 1


def test_host_evictions_spill_to_disk_and_load_back(tmp_path: Path) -> None:
    kv = pool()
    original = kv.clone()
    block_bytes = kv[:, :, 0].numel() * 4
    tier = KVTierStore(kv, host_capacity_bytes=block_bytes, disk=disk_store(tmp_path))
    tier.offload(0, 10)
    tier.offload(1, 11)  # 10 spills to disk (on the writer thread)
    tier.flush()
    assert tier.num_host_blocks == 1 and tier.disk is not None and tier.disk.contains(10)
    assert tier.snapshot()["disk"].stored == 1
    kv[:, :, 2].zero_()
    assert tier.load(10, 2)
    assert torch.equal(kv[:, :, 2], original[:, :, 0])
    assert tier.stats["disk"].hits == 1 and tier.stats["host"].misses == 1
    events = tier.drain_events()
    assert events == {"host": ([11], []), "disk": ([10], [])}


def test_a_queued_disk_write_is_found_and_loaded_before_it_lands(tmp_path: Path) -> None:
    """The engine never waits for a file: an eviction only queues the write, and a lookup
    meanwhile finds the block in the queue; a full queue drops writes, not the engine."""
    import threading

    kv = pool()
    original = kv.clone()
    store = disk_store(tmp_path)
    gate = threading.Event()
    real_put = store.put

    def slow_put(block_hash: int, block: torch.Tensor) -> bool:
        gate.wait(10)
        return real_put(block_hash, block)

    store.put = slow_put  # type: ignore[method-assign]
    tier = KVTierStore(kv, host_capacity_bytes=0, disk=store)
    assert tier._writer is not None
    tier._writer.max_pending = 2
    tier.offload(0, 10)
    tier.offload(1, 11)
    tier.offload(2, 12)  # the queue is full: dropped
    assert tier._writer.dropped == 1 and not tier.contains(12)
    kv[:, :, 0:2].zero_()
    assert tier.contains(10) and tier.load(10, 3)  # from the queue, before the file exists
    assert torch.equal(kv[:, :, 3], original[:, :, 0])
    gate.set()
    tier.flush()
    assert store.contains(10) and store.contains(11) and not store.contains(12)


# ---- through the engine -----------------------------------------------------------------

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def conversation_prompts() -> list[list[int]]:
    """Three 'conversations' of two turns each; turn 2 extends turn 1's prompt, and the
    other conversations run in between (so a tiny pool has evicted turn 1 by then)."""
    firsts = [[(7 * c + i) % 200 + 3 for i in range(40)] for c in range(3)]
    seconds = [p + [(11 * c + i) % 200 + 3 for i in range(9)] for c, p in enumerate(firsts)]
    return firsts + seconds


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_greedy_tokens_equal_with_the_tier_on_and_off(tiny_llama: Path, tmp_path: Path,
                                                      tier: str) -> None:
    common = dict(num_kv_blocks=9, block_size=8, max_model_len=72)
    off = LLM(model=str(tiny_llama), **common)
    extra = ({"host_kv_cache_bytes": 1 << 24} if tier == "host"
             else {"disk_kv_cache_dir": str(tmp_path / "kv")})
    on = LLM(model=str(tiny_llama), **common, **extra)
    prompts = conversation_prompts()
    want = [off.generate([p], GREEDY)[0] for p in prompts]
    got = [on.generate([p], GREEDY)[0] for p in prompts]
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    # The second turns found turn 1's blocks in the tier (5 blocks of 8: 40 tokens).
    assert [o.num_cached_tokens for o in got[3:]] == [40, 40, 40]
    assert all(o.num_cached_tokens == 0 for o in want[3:])
    kv_tier = on.engine.kv_tier
    assert kv_tier is not None and kv_tier.stats[tier].hits == 15
    assert on.engine.block_manager.stats.tier_hits == 120


# ---- property-based: random traffic through a bounded tier, contents checked ---------------


class ShadowTier:
    """A bounded LRU tier over the shadow contents `written` (block id -> its tokens)."""

    def __init__(self, written: dict[int, list[int]], capacity: int) -> None:
        self.written, self.capacity = written, capacity
        self.entries: dict[int, list[int]] = {}  # insertion order = LRU order

    def offload(self, block_id: int, block_hash: int) -> None:
        self.entries.pop(block_hash, None)
        self.entries[block_hash] = list(self.written[block_id])
        while len(self.entries) > self.capacity:
            del self.entries[next(iter(self.entries))]

    def contains(self, block_hash: int) -> bool:
        if block_hash in self.entries:
            self.entries[block_hash] = self.entries.pop(block_hash)
            return True
        return False

    def load(self, block_hash: int, block_id: int) -> bool:
        if block_hash not in self.entries:
            return False
        self.written[block_id] = list(self.entries[block_hash])
        return True

    def record_miss(self) -> None:
        pass


class TierMachine(RuleBasedStateMachine):
    """Sequences come, compute, cache and go on an 8-block pool over a 6-block tier; every
    block a prompt gets from a cache (device or tier) holds exactly its tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.written: dict[int, list[int]] = {}
        self.bm = BlockManager(8, 2, tier=ShadowTier(self.written, capacity=6))
        self.live: list[Sequence] = []
        self.reserved: list[list[int]] = []
        self.count = 0
        self.tier_hits = 0

    @rule(tokens=st.lists(st.integers(0, 1), min_size=1, max_size=9))
    def admit(self, tokens: list[int]) -> None:
        self.count += 1
        seq = Sequence(f"s{self.count}", tokens, PARAMS)
        match = self.bm.match_prefix(seq)
        cached = len(match) * 2
        if not self.bm.allocate_slots(seq, len(tokens) - cached, match):
            assert seq.block_table == [] and seq.num_computed_tokens == 0
            return
        self.tier_hits += sum(b is None for b in match.block_ids)
        for i in range(seq.num_cached_tokens // 2):  # every cache hit holds its tokens
            assert self.written[seq.block_table[i]] == tokens[2 * i: 2 * i + 2]
        for pos in range(seq.num_computed_tokens, len(tokens)):  # "compute" the rest
            block = seq.block_table[pos // 2]
            if pos % 2 == 0:
                self.written[block] = []
            self.written[block].append(tokens[pos])
        seq.num_computed_tokens = len(tokens)
        self.bm.cache_full_blocks(seq)
        self.live.append(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(self.live))
        self.live.remove(seq)
        self.bm.free(seq)

    @rule(num=st.integers(1, 4))
    def reserve(self, num: int) -> None:  # incoming KV from a prefill worker: evicts
        blocks = self.bm.allocate_blocks(num)
        if blocks is not None:
            for block in blocks:
                self.written[block] = [-1, -1]
            self.reserved.append(blocks)

    @precondition(lambda self: self.reserved)
    @rule()
    def release(self) -> None:
        self.bm.free_blocks(self.reserved.pop(0))

    @invariant()
    def consistent(self) -> None:
        self.bm.check_invariants([s.block_table for s in self.live] + self.reserved)


TestTierMachine = TierMachine.TestCase
TestTierMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_a_better_class_whose_prefix_is_in_the_tier_preempts_for_fresh_blocks() -> None:
    """Blocks loaded from the tier need free device blocks: a priority-0 request whose
    prefix is only in the tier must make a worse class's running sequence give way."""
    from splitserve.engine.scheduler import Scheduler, SchedulerConfig

    tier = FakeTier()
    bm = BlockManager(num_blocks=4, block_size=4, tier=tier)
    sched = Scheduler(SchedulerConfig(8, 64), bm)
    low = Sequence("low", list(range(100, 112)), SamplingParams(max_tokens=8), priority=5)
    sched.add(low)
    out = sched.schedule()
    assert [item.seq for item in out.scheduled] == [low] and bm.num_free_blocks == 1
    low.num_computed_tokens = low.num_tokens
    low.append_token(7)
    high_prompt = list(range(200, 209))  # two full blocks, both only in the tier
    for block_hash in compute_block_hashes(high_prompt, 4):
        tier.blocks[block_hash] = 0
    high = Sequence("high", high_prompt, SamplingParams(max_tokens=8), priority=0)
    sched.add(high)
    out = sched.schedule()
    assert low in out.preempted
    assert high in [item.seq for item in out.scheduled]
    assert len(tier.loads) == 2  # its prefix came from the tier, not recomputed
