"""BlockManager: exact block ids, eviction order and prefix-cache events, then a
hypothesis state machine that checks the allocator against a shadow model of block contents."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from splitserve.common.sampling_params import SamplingParams
from splitserve.engine.block_hash import compute_block_hashes
from splitserve.engine.block_manager import BlockManager, PrefixCacheStats
from splitserve.engine.sequence import Sequence

PARAMS = SamplingParams()


def make_seq(tokens: list[int], request_id: str = "r") -> Sequence:
    return Sequence(request_id, list(tokens), PARAMS)


def compute(
    bm: BlockManager, seq: Sequence, num_tokens: int, computed: tuple[int, ...] | list[int] = ()
) -> None:
    """Allocate, "run the model" on num_tokens tokens and register full blocks, as a step does."""
    assert bm.allocate_slots(seq, num_tokens, computed)
    seq.num_computed_tokens += num_tokens
    bm.cache_full_blocks(seq)


def hashes(tokens: list[int], block_size: int) -> list[int]:
    return compute_block_hashes(tokens, block_size)


# ---- plain allocation ------------------------------------------------------------------------
def test_fresh_allocations_take_block_ids_in_order() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = make_seq(list(range(10)), "a"), make_seq(list(range(100, 105)), "b")
    assert bm.allocate_slots(a, 10)
    assert bm.allocate_slots(b, 5)
    assert a.block_table == [0, 1, 2]
    assert b.block_table == [3, 4]
    assert [bm.ref_count(i) for i in range(8)] == [1, 1, 1, 1, 1, 0, 0, 0]
    assert bm.num_free_blocks == 3
    assert bm.usage == pytest.approx(5 / 8)
    bm.check_invariants([a.block_table, b.block_table])


def test_allocate_slots_grows_the_table_chunk_by_chunk() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(list(range(11)))
    compute(bm, seq, 3)
    assert seq.block_table == [0]
    compute(bm, seq, 1)  # slot 3: still block 0
    assert seq.block_table == [0]
    compute(bm, seq, 5)  # slots 4..8 -> blocks 1, 2
    assert seq.block_table == [0, 1, 2]
    assert bm.allocate_slots(seq, 0)
    assert seq.block_table == [0, 1, 2]
    assert bm.num_free_blocks == 5
    bm.check_invariants([seq.block_table])


def test_free_returns_blocks_tail_first() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(list(range(12)))
    assert bm.allocate_slots(seq, 12)
    assert seq.block_table == [0, 1, 2]
    bm.free(seq)
    assert seq.block_table == []
    assert bm.num_free_blocks == 8
    bm.check_invariants([])
    # Never-used blocks come first, then the freed ones with the sequence's tail first.
    assert bm.allocate_blocks(8) == [3, 4, 5, 6, 7, 2, 1, 0]


def test_allocate_slots_refuses_and_changes_nothing_when_the_pool_is_short() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq(list(range(12)), "a")
    compute(bm, a, 12)
    b = make_seq(list(range(100, 108)), "b")
    assert not bm.allocate_slots(b, 8)  # needs 2, 1 free
    assert b.block_table == [] and b.num_computed_tokens == 0
    assert a.block_table == [0, 1, 2]
    assert bm.num_free_blocks == 1
    bm.check_invariants([a.block_table])
    assert not bm.allocate_slots(a, 5)  # a: 12 computed + 5 -> 5 blocks, has 3, 1 free
    assert a.block_table == [0, 1, 2]
    bm.check_invariants([a.block_table])
    assert bm.allocate_slots(a, 4)
    assert a.block_table == [0, 1, 2, 3]


def test_refusal_counts_revived_prefix_blocks_against_the_pool() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    a = make_seq([1, 2, 3, 4, 5], "a")
    compute(bm, a, 5)
    bm.free(a)  # free queue: 2, 1, 0; blocks 0 and 1 cached
    reservation = bm.allocate_blocks(1)
    assert reservation == [2]
    b = make_seq([1, 2, 3, 4, 9, 9, 9], "b")
    hits = bm.get_computed_blocks(b)
    assert hits == [0, 1]
    # 2 revived + 2 new (7 tokens -> 4 blocks) > 2 free.
    assert not bm.allocate_slots(b, 3, hits)
    assert b.block_table == [] and b.num_computed_tokens == 0 and b.num_cached_tokens == 0
    assert bm.ref_count(0) == 0 and bm.ref_count(1) == 0 and bm.num_free_blocks == 2
    bm.check_invariants([reservation])
    # The refused attempt left the cache intact: the same hits are still there.
    assert bm.get_computed_blocks(b) == [0, 1]


def test_computed_blocks_only_start_an_empty_table() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq([1, 2, 3], "a")
    compute(bm, a, 3)
    b = make_seq([1, 2, 3], "b")
    assert bm.allocate_slots(b, 1)
    with pytest.raises(ValueError, match="empty block table"):
        bm.allocate_slots(b, 1, [0])


def test_double_free_raises() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    ids = bm.allocate_blocks(2)
    assert ids == [0, 1]
    bm.free_blocks(ids)
    with pytest.raises(RuntimeError, match="double free of block"):
        bm.free_blocks(ids)
    with pytest.raises(RuntimeError, match="double free of block 3"):
        bm.free_blocks([3])


def test_freeing_a_sequence_twice_is_a_no_op() -> None:
    """free() clears the block table, so a second free (e.g. remove after preempt) is safe."""
    bm = BlockManager(num_blocks=4, block_size=2)
    seq = make_seq([1, 2, 3])
    compute(bm, seq, 3)
    bm.free(seq)
    bm.free(seq)
    assert bm.num_free_blocks == 4
    bm.check_invariants([])


def test_reservations_allocate_and_free() -> None:
    bm = BlockManager(num_blocks=5, block_size=4)
    first = bm.allocate_blocks(2)
    second = bm.allocate_blocks(3)
    assert first == [0, 1] and second == [2, 3, 4]
    assert bm.allocate_blocks(1) is None
    assert bm.allocate_blocks(0) == []
    bm.check_invariants([first, second])
    bm.free_blocks(second)
    assert bm.num_free_blocks == 3
    bm.check_invariants([first])
    assert bm.allocate_blocks(4) is None  # refused: nothing taken
    assert bm.num_free_blocks == 3
    assert bm.allocate_blocks(3) == [4, 3, 2]  # freed tail-first


def test_invalid_sizes_raise() -> None:
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=4)
    with pytest.raises(ValueError):
        BlockManager(num_blocks=4, block_size=0)


def test_check_invariants_catches_a_wrong_block_table() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    seq = make_seq([1, 2, 3])
    compute(bm, seq, 3)
    bm.check_invariants([[0, 1]])
    with pytest.raises(AssertionError, match="block 1"):
        bm.check_invariants([[0]])
    with pytest.raises(AssertionError, match="block 0"):
        bm.check_invariants([[0, 1], [0]])


# ---- prefix cache ----------------------------------------------------------------------------
def test_prefix_hit_after_cache_full_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(list(range(14)), "a")
    compute(bm, a, 14)
    assert a.block_table == [0, 1, 2, 3]
    assert bm.num_cached_blocks == 3  # the 4th block is partial
    b = make_seq(list(range(10)) + [77, 78], "b")
    hits = bm.get_computed_blocks(b)
    assert hits == [0, 1]
    assert bm.allocate_slots(b, b.num_tokens - 8, hits)
    assert b.block_table == [0, 1, 4]
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert [bm.ref_count(i) for i in range(5)] == [2, 2, 1, 1, 1]
    bm.check_invariants([a.block_table, b.block_table])


def test_hashes_are_chained() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(list(range(13)), "a")
    compute(bm, a, 13)
    other_first = make_seq([99, 1, 2, 3] + list(range(4, 13)), "b")
    assert bm.get_computed_blocks(other_first) == []  # block 1 equal, but its parent differs
    other_second = make_seq(list(range(4)) + [99] + list(range(5, 13)), "c")
    assert bm.get_computed_blocks(other_second) == [0]
    assert bm.get_computed_blocks(make_seq(list(range(13)), "d")) == [0, 1, 2]


def test_at_least_one_token_is_left_to_compute() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(list(range(12)), "a")
    compute(bm, a, 12)
    assert bm.num_cached_blocks == 3
    exact = make_seq(list(range(12)), "b")
    assert bm.get_computed_blocks(exact) == [0, 1]
    one_more = make_seq(list(range(13)), "c")
    assert bm.get_computed_blocks(one_more) == [0, 1, 2]
    assert bm.get_computed_blocks(make_seq([0], "d")) == []


def test_a_sequence_with_blocks_gets_no_hits() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    a = make_seq([1, 2, 3, 4, 5], "a")
    compute(bm, a, 5)
    assert bm.get_computed_blocks(a) == []


def test_cache_full_blocks_registers_only_computed_full_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(10))
    seq = make_seq(tokens)
    assert bm.allocate_slots(seq, 10)
    seq.num_computed_tokens = 6
    bm.cache_full_blocks(seq)
    h = hashes(tokens, 4)
    assert bm.num_cached_blocks == 1
    assert bm.drain_events() == ([h[0]], [])
    seq.num_computed_tokens = 10
    bm.cache_full_blocks(seq)
    bm.cache_full_blocks(seq)  # idempotent
    assert bm.num_cached_blocks == 2
    assert bm.drain_events() == ([h[1]], [])
    assert bm.drain_events() == ([], [])


def test_lru_eviction_of_unreferenced_cached_blocks() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq([1, 2, 3, 4], "a")
    b = make_seq([5, 6, 7, 8], "b")
    compute(bm, a, 4)
    compute(bm, b, 4)
    assert (a.block_table, b.block_table) == ([0, 1], [2, 3])
    ha, hb = hashes([1, 2, 3, 4], 2), hashes([5, 6, 7, 8], 2)
    assert bm.drain_events() == ([ha[0], ha[1], hb[0], hb[1]], [])
    bm.free(a)  # queue: 1, 0
    bm.free(b)  # queue: 1, 0, 3, 2
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 4
    assert bm.allocate_blocks(1) == [1]  # a's tail: the earliest-freed cached block
    assert bm.drain_events() == ([], [ha[1]])
    assert bm.num_cached_blocks == 3
    assert bm.get_computed_blocks(make_seq([1, 2, 3, 4, 0], "a2")) == [0]
    assert bm.allocate_blocks(2) == [0, 3]
    assert bm.drain_events() == ([], [ha[0], hb[1]])
    assert bm.get_computed_blocks(make_seq([5, 6, 7, 8, 0], "b2")) == [2]
    assert bm.num_cached_blocks == 1


def test_revived_block_leaves_the_free_queue() -> None:
    bm = BlockManager(num_blocks=6, block_size=2)
    a = make_seq([1, 2, 3, 4, 5], "a")
    compute(bm, a, 5)
    assert a.block_table == [0, 1, 2]
    bm.free(a)  # queue: 3, 4, 5, 2, 1, 0
    b = make_seq([1, 2, 3, 4, 8], "b")
    hits = bm.get_computed_blocks(b)
    assert hits == [0, 1]
    assert bm.allocate_slots(b, 1, hits)
    assert b.block_table == [0, 1, 3]
    assert [bm.ref_count(i) for i in range(6)] == [1, 1, 0, 1, 0, 0]
    assert bm.num_free_blocks == 3
    bm.check_invariants([b.block_table])
    assert bm.allocate_blocks(3) == [4, 5, 2]  # the revived blocks are not handed out
    assert bm.drain_events()[1] == []  # block 2 held a partial block: nothing evicted


def test_shared_blocks_are_counted_per_holder() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    a = make_seq([1, 2, 3, 4, 5], "a")
    compute(bm, a, 5)
    b = make_seq([1, 2, 3, 4, 6, 7], "b")
    hits = bm.get_computed_blocks(b)
    assert hits == [0, 1]
    compute(bm, b, 2, hits)
    assert b.block_table == [0, 1, 3]
    assert bm.ref_count(0) == 2 and bm.ref_count(1) == 2
    bm.check_invariants([a.block_table, b.block_table])
    bm.free(a)
    assert [bm.ref_count(i) for i in range(4)] == [1, 1, 0, 1]
    assert bm.num_free_blocks == 8 - 3
    bm.check_invariants([b.block_table])
    bm.free(b)
    assert bm.num_free_blocks == 8
    bm.check_invariants([])


def test_same_content_in_two_blocks_is_cached_once() -> None:
    bm = BlockManager(num_blocks=6, block_size=2)
    a = make_seq([1, 2, 3], "a")
    b = make_seq([1, 2, 4], "b")
    assert bm.allocate_slots(a, 3) and bm.allocate_slots(b, 3)  # both before either caches
    for seq in (a, b):
        seq.num_computed_tokens = 3
        bm.cache_full_blocks(seq)
    h = hashes([1, 2], 2)[0]
    assert bm.drain_events() == ([h], [])
    assert bm.num_cached_blocks == 1
    assert bm.get_computed_blocks(make_seq([1, 2, 5], "c")) == [0]
    bm.free(b)  # b's uncached block 2 returns with no hash: reusing it evicts nothing
    bm.free(a)
    assert bm.allocate_blocks(6) == [4, 5, 3, 2, 1, 0]
    assert bm.drain_events() == ([], [h])


def test_reset_prefix_cache_forgets_only_unreferenced_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    a = make_seq([1, 2, 3, 4, 5], "a")
    b = make_seq([6, 7, 8], "b")
    compute(bm, a, 5)
    compute(bm, b, 3)
    bm.free(a)
    bm.drain_events()
    bm.reset_prefix_cache()
    ha = hashes([1, 2, 3, 4], 2)
    assert bm.drain_events() == ([], ha)
    assert bm.num_cached_blocks == 1
    assert bm.num_free_blocks == 8 - 2
    assert bm.get_computed_blocks(make_seq([1, 2, 3, 4, 5], "a2")) == []
    assert bm.get_computed_blocks(make_seq([6, 7, 0], "b2")) == b.block_table[:1]
    bm.check_invariants([b.block_table])
    # Reused later, the forgotten blocks report no second eviction.
    assert bm.allocate_blocks(6) == [5, 6, 7, 2, 1, 0]
    assert bm.drain_events() == ([], [])


def test_prefix_cache_stats() -> None:
    """Counted over the admission protocol (get_computed_blocks, then allocate_slots), so
    the test holds whichever of the two does the counting."""
    assert PrefixCacheStats().hit_rate == 0.0
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(list(range(12)), "a")
    compute(bm, a, 12, bm.get_computed_blocks(a))
    assert (bm.stats.queries, bm.stats.hits) == (12, 0)
    b = make_seq(list(range(10)), "b")
    hits = bm.get_computed_blocks(b)
    compute(bm, b, 2, hits)
    assert (bm.stats.queries, bm.stats.hits) == (22, 8)
    c = make_seq(list(range(8)) + [50] * 10, "c")
    compute(bm, c, 10, bm.get_computed_blocks(c))
    assert (bm.stats.queries, bm.stats.hits) == (40, 16)
    assert bm.stats.hit_rate == pytest.approx(0.4)


def test_disabled_prefix_caching_never_caches_or_hits() -> None:
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a = make_seq([1, 2, 3, 4, 5], "a")
    compute(bm, a, 5)
    assert bm.num_cached_blocks == 0
    assert bm.get_computed_blocks(make_seq([1, 2, 3, 4, 5], "b")) == []
    assert bm.drain_events() == ([], [])
    assert (bm.stats.queries, bm.stats.hits) == (0, 0)


# ---- property-based: random interleavings against a shadow model -----------------------------
NUM_BLOCKS = 8
BLOCK_SIZE = 2
TOKENS = st.lists(st.integers(0, 1), min_size=1, max_size=10)  # tiny alphabet: prefixes collide


class BlockManagerMachine(RuleBasedStateMachine):
    """Shadow model: `written[b]` holds the tokens this test "wrote" into block b's slots,
    `cached` the hashes that drain_events says are in the prefix cache, and `free_order`
    the expected free queue (head first), so every handed-out block id is checked exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(NUM_BLOCKS, BLOCK_SIZE)
        self.live: list[Sequence] = []
        self.reservations: list[list[int]] = []
        self.written: dict[int, list[int | None]] = {}
        self.cached: set[int] = set()
        self.free_order: list[int] = list(range(NUM_BLOCKS))
        self.count = 0

    def tables(self) -> list[list[int]]:
        return [s.block_table for s in self.live] + self.reservations

    def _expect_taken(self, blocks: list[int]) -> None:
        assert blocks == self.free_order[: len(blocks)], "not taken from the free queue's head"
        del self.free_order[: len(blocks)]

    def _expect_freed(self, blocks: list[int]) -> None:
        for block_id in reversed(blocks):
            if self.bm.ref_count(block_id) == 0:
                self.free_order.append(block_id)

    def _write(self, seq: Sequence, old_len: int, num_tokens: int) -> None:
        for block_id in seq.block_table[old_len:]:
            self.written[block_id] = [None] * BLOCK_SIZE  # fresh: contents unknown
        start = seq.num_computed_tokens
        for pos in range(start, start + num_tokens):
            block_id = seq.block_table[pos // BLOCK_SIZE]
            assert self.bm.ref_count(block_id) == 1, "writing into a shared block"
            self.written[block_id][pos % BLOCK_SIZE] = seq.token_ids[pos]
        seq.num_computed_tokens += num_tokens

    def _drain(self) -> None:
        stored, evicted = self.bm.drain_events()
        for h in stored:
            assert h not in self.cached
            self.cached.add(h)
        for h in evicted:
            assert h in self.cached
            self.cached.remove(h)

    @rule(tokens=TOKENS, chunk=st.integers(1, 10), cache=st.booleans())
    def add_sequence(self, tokens: list[int], chunk: int, cache: bool) -> None:
        self.count += 1
        seq = make_seq(tokens, f"s{self.count}")
        self._drain()
        hits = self.bm.get_computed_blocks(seq)
        # The longest cached prefix, leaving one token to compute.
        expected = 0
        for h in hashes(tokens, BLOCK_SIZE)[: (len(tokens) - 1) // BLOCK_SIZE]:
            if h not in self.cached:
                break
            expected += 1
        assert len(hits) == expected
        for i, block_id in enumerate(hits):
            assert self.written[block_id] == tokens[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]
        num_tokens = min(chunk, len(tokens) - len(hits) * BLOCK_SIZE)
        free_before = self.bm.num_free_blocks
        if not self.bm.allocate_slots(seq, num_tokens, hits):
            assert seq.block_table == [] and seq.num_computed_tokens == 0
            assert self.bm.num_free_blocks == free_before
            return
        assert seq.block_table[: len(hits)] == hits
        assert seq.num_cached_tokens == len(hits) * BLOCK_SIZE
        self.free_order = [b for b in self.free_order if b not in hits]  # revived
        self._expect_taken(seq.block_table[len(hits) :])
        self._write(seq, len(hits), num_tokens)
        self.live.append(seq)
        if cache:
            self.bm.cache_full_blocks(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), chunk=st.integers(1, 6), token=st.integers(0, 1), cache=st.booleans())
    def step(self, data: st.DataObject, chunk: int, token: int, cache: bool) -> None:
        seq = data.draw(st.sampled_from(self.live))
        if seq.num_uncomputed_tokens == 0:
            seq.append_token(token)  # a decode: the sampled token joins the sequence
        num_tokens = min(chunk, seq.num_uncomputed_tokens)
        table_before = list(seq.block_table)
        free_before = self.bm.num_free_blocks
        if not self.bm.allocate_slots(seq, num_tokens):
            assert seq.block_table == table_before
            assert self.bm.num_free_blocks == free_before
            return
        assert seq.block_table[: len(table_before)] == table_before
        self._expect_taken(seq.block_table[len(table_before) :])
        self._write(seq, len(table_before), num_tokens)
        if cache:
            self.bm.cache_full_blocks(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(self.live))
        self.live.remove(seq)
        table = list(seq.block_table)
        self.bm.free(seq)
        self._expect_freed(table)

    @rule(num=st.integers(0, 3))
    def reserve(self, num: int) -> None:
        blocks = self.bm.allocate_blocks(num)
        if blocks is None:
            assert num > self.bm.num_free_blocks
            return
        self._expect_taken(blocks)
        for block_id in blocks:
            self.written[block_id] = [-1] * BLOCK_SIZE  # received KV: never a prefix hit
        self.reservations.append(blocks)

    @precondition(lambda self: self.reservations)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.reservations) - 1))
        blocks = self.reservations.pop(index)
        self.bm.free_blocks(blocks)
        self._expect_freed(blocks)

    @rule()
    def reset_prefix_cache(self) -> None:
        self.bm.reset_prefix_cache()

    @rule()
    def free_everything(self) -> None:
        for seq in self.live:
            table = list(seq.block_table)
            self.bm.free(seq)
            self._expect_freed(table)
        for blocks in self.reservations:
            self.bm.free_blocks(blocks)
            self._expect_freed(blocks)
        self.live, self.reservations = [], []
        assert self.bm.num_free_blocks == NUM_BLOCKS
        self.bm.check_invariants([])

    @invariant()
    def consistent(self) -> None:
        self.bm.check_invariants(self.tables())
        held = {b for table in self.tables() for b in table}
        assert all(self.bm.ref_count(b) > 0 for b in held)
        assert self.bm.num_free_blocks + len(held) == NUM_BLOCKS
        assert sorted(self.free_order) == sorted(set(range(NUM_BLOCKS)) - held)
        for seq in self.live:
            assert len(seq.block_table) == self.bm.blocks_needed(seq.num_computed_tokens)
        self._drain()
        assert len(self.cached) == self.bm.num_cached_blocks


BlockManagerMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=30, deadline=None
)
TestBlockManagerMachine = BlockManagerMachine.TestCase


def test_prefix_event_log_reports_net_changes() -> None:
    from splitserve.engine.block_manager import PrefixEventLog

    log = PrefixEventLog()
    log.stored(1)
    log.stored(2)
    log.evicted(2)  # stored then evicted: no net change
    log.evicted(3)
    assert log.drain() == ([1], [3])
    log.evicted(1)
    log.stored(1)  # evicted then stored again: still held, no net change
    assert log.drain() == ([], [])
    later = PrefixEventLog()
    later.stored(5)
    later.evicted(6)
    log.stored(6)
    log.merge(*later.drain())
    assert log.drain() == ([5], [])
