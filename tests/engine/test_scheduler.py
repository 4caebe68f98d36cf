"""Scheduler with a real BlockManager and no model: a simulated step advances
num_computed_tokens by the planned counts and appends a token where a sequence completes,
as engine/llm_engine.py does."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from splitserve.common.sampling_params import SamplingParams
from splitserve.engine.block_manager import BlockManager
from splitserve.engine.fair_share import LINGER_S, ClientShares
from splitserve.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from splitserve.engine.sequence import Sequence, SequenceStatus


class Sim:
    """A scheduler plus the bookkeeping half of LLMEngine.step()."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int = 4,
        max_num_seqs: int = 8,
        max_num_batched_tokens: int = 16,
        enable_prefix_caching: bool = True,
        priority_aging_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        client_weights: tuple[tuple[str, float], ...] = (),
    ):
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.config = SchedulerConfig(max_num_seqs, max_num_batched_tokens,
                                      priority_aging_s=priority_aging_s,
                                      client_weights=client_weights)
        self.sched = Scheduler(self.config, self.bm, clock=clock)
        self.finished: list[Sequence] = []
        self.completed: list[str] = []  # request ids that sampled a token in the last step
        self.steps = 0

    def add(self, request_id: str, prompt: list[int], max_tokens: int,
            priority: int = 0) -> Sequence:
        seq = Sequence(request_id, prompt, SamplingParams(max_tokens=max_tokens),
                       priority=priority)
        self.sched.add(seq)
        return seq

    def step(self) -> SchedulerOutput:
        out = self.sched.schedule()
        self.steps += 1
        assert out.num_tokens <= self.config.max_num_batched_tokens
        assert len(out.scheduled) <= self.config.max_num_seqs
        assert self.sched.num_running <= self.config.max_num_seqs
        seqs = [item.seq for item in out.scheduled]
        assert len({id(s) for s in seqs}) == len(seqs), "a sequence scheduled twice"
        assert not {id(s) for s in out.preempted} & {id(s) for s in seqs}
        self.completed = []
        for item in out.scheduled:
            seq = item.seq
            assert item.num_tokens >= 1
            assert seq.status is SequenceStatus.RUNNING
            completes = item.completes  # decided before the counters move
            seq.num_computed_tokens += item.num_tokens
            assert len(seq.block_table) == self.bm.blocks_needed(seq.num_computed_tokens)
            self.bm.cache_full_blocks(seq)
            if completes:
                self.completed.append(seq.request_id)
                seq.append_token(10_000 + seq.num_tokens)  # unique per position: no false hits
                if seq.num_output_tokens >= seq.params.max_tokens:
                    self.sched.remove(seq)
                    seq.status = SequenceStatus.FINISHED
                    self.finished.append(seq)
        self.check()
        return out

    def check(self) -> None:
        live = list(self.sched.running) + list(self.sched.waiting)
        self.bm.check_invariants([s.block_table for s in live])
        assert all(s.block_table == [] for s in self.sched.waiting)

    def run(self, max_steps: int = 1000) -> None:
        while self.sched.has_unfinished():
            self.step()
            assert self.steps < max_steps, "no progress"


def plan(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(item.seq.request_id, item.num_tokens) for item in out.scheduled]


def prompt(base: int, n: int) -> list[int]:
    return list(range(base, base + n))


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        SchedulerConfig(max_num_seqs=0, max_num_batched_tokens=8)
    with pytest.raises(ValueError):
        SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=0)


def test_chunked_prefill_never_stalls_running_decodes() -> None:
    sim = Sim(num_blocks=16, block_size=4, max_num_batched_tokens=8)
    a = sim.add("a", prompt(0, 3), max_tokens=10)
    assert plan(sim.step()) == [("a", 3)]
    sim.add("b", prompt(100, 20), max_tokens=2)
    assert plan(sim.step()) == [("a", 1), ("b", 7)]
    assert plan(sim.step()) == [("a", 1), ("b", 7)]
    assert sim.completed == ["a"]  # b's chunks so far sample nothing
    assert plan(sim.step()) == [("a", 1), ("b", 6)]
    assert sim.completed == ["a", "b"]
    assert plan(sim.step()) == [("a", 1), ("b", 1)]  # b's last decode: b finishes
    assert [s.request_id for s in sim.finished] == ["b"]
    assert plan(sim.step()) == [("a", 1)]
    assert a.num_output_tokens == 6
    sim.run()
    assert sim.bm.num_free_blocks == sim.bm.num_blocks
    sim.bm.check_invariants([])


def test_prompt_chunks_complete_only_on_the_last_chunk() -> None:
    sim = Sim(num_blocks=8, block_size=4, max_num_batched_tokens=5)
    b = sim.add("b", prompt(0, 12), max_tokens=1)
    outs = [sim.step() for _ in range(3)]
    assert [plan(o) for o in outs] == [[("b", 5)], [("b", 5)], [("b", 2)]]
    assert b.is_finished and b.num_output_tokens == 1
    assert not sim.sched.has_unfinished()


def test_max_num_seqs_and_fcfs_admission() -> None:
    sim = Sim(num_blocks=16, max_num_seqs=2, max_num_batched_tokens=32)
    for name in "abcd":
        sim.add(name, prompt(100 * (ord(name) - 96), 3), max_tokens=2 if name == "a" else 4)
    assert plan(sim.step()) == [("a", 3), ("b", 3)]
    assert [s.request_id for s in sim.sched.waiting] == ["c", "d"]
    assert plan(sim.step()) == [("a", 1), ("b", 1)]  # a finishes; c is admitted next step
    assert plan(sim.step()) == [("b", 1), ("c", 3)]
    sim.run()
    assert [s.request_id for s in sim.finished] == ["a", "b", "c", "d"]


def test_head_of_line_waits_for_blocks_and_is_not_overtaken() -> None:
    sim = Sim(num_blocks=4, block_size=4, max_num_batched_tokens=32)
    sim.add("a", prompt(0, 8), max_tokens=2)
    sim.add("b", prompt(100, 12), max_tokens=1)  # 3 blocks: waits for a
    sim.add("c", prompt(200, 2), max_tokens=1)  # 1 block would fit, but b is first
    assert plan(sim.step()) == [("a", 8)]
    assert [s.request_id for s in sim.sched.waiting] == ["b", "c"]
    assert plan(sim.step()) == [("a", 1)]  # a finishes and frees its blocks
    assert plan(sim.step()) == [("b", 12), ("c", 2)]  # b first (3 blocks), then c (1)
    sim.run()
    assert [s.request_id for s in sim.finished] == ["a", "b", "c"]


def test_preemption_picks_the_newest_and_resumes_it() -> None:
    sim = Sim(num_blocks=6, block_size=2, max_num_batched_tokens=32)
    a = sim.add("a", prompt(0, 3), max_tokens=4)
    b = sim.add("b", prompt(100, 3), max_tokens=4)
    c = sim.add("c", prompt(200, 3), max_tokens=4)
    assert plan(sim.step()) == [("a", 3), ("b", 3), ("c", 3)]
    assert (a.block_table, b.block_table, c.block_table) == ([0, 1], [2, 3], [4, 5])
    assert plan(sim.step()) == [("a", 1), ("b", 1), ("c", 1)]  # token 4 fits in block 1
    sim.bm.drain_events()
    c_outputs = c.output_token_ids
    assert len(c_outputs) == 2
    out = sim.step()  # everyone needs a 3rd block; none is free
    assert out.preempted == [c]
    assert plan(out) == [("a", 1), ("b", 1)]
    assert (a.block_table, b.block_table) == ([0, 1, 5], [2, 3, 4])  # c's blocks, tail first
    assert c.block_table == [] and c.num_computed_tokens == 0 and c.num_cached_tokens == 0
    assert c.status is SequenceStatus.WAITING and c.num_preemptions == 1
    assert c.output_token_ids == c_outputs
    assert list(sim.sched.waiting) == [c] and sim.sched.running == [a, b]
    c_hashes = c.block_hashes(2)
    assert sim.bm.drain_events() == ([], [c_hashes[1], c_hashes[0]])
    while c.status is not SequenceStatus.RUNNING:
        sim.step()
    sim.run()
    assert [s.request_id for s in sim.finished] == ["a", "b", "c"]
    assert c.num_output_tokens == 4 and c.output_token_ids[:2] == c_outputs
    assert sim.bm.num_free_blocks == 6
    sim.bm.check_invariants([])


def test_preempted_prefill_is_pushed_in_front_of_the_queue() -> None:
    sim = Sim(num_blocks=4, block_size=2, max_num_batched_tokens=4)
    a = sim.add("a", prompt(0, 3), max_tokens=4)
    b = sim.add("b", prompt(100, 6), max_tokens=1)
    assert plan(sim.step()) == [("a", 3), ("b", 1)]  # blocks: a [0, 1], b [2]
    assert plan(sim.step()) == [("a", 1), ("b", 3)]  # b grows to [2, 3]
    sim.add("c", prompt(200, 2), max_tokens=1)
    out = sim.step()  # a needs a 3rd block: b (newest) is preempted mid-prompt
    assert out.preempted == [b] and plan(out) == [("a", 1)]
    assert [s.request_id for s in sim.sched.waiting] == ["b", "c"]
    assert b.num_computed_tokens == 0 and b.num_output_tokens == 0
    assert a.block_table == [0, 1, 3]  # b's blocks freed tail first
    out = sim.step()  # a finishes; b (one cached block left) still does not fit
    assert plan(out) == [("a", 1)] and a.is_finished
    out = sim.step()
    assert plan(out) == [("b", 4)]  # resumed from the front, its first block a prefix hit
    assert b.num_cached_tokens == 2
    sim.run()
    assert [s.request_id for s in sim.finished] == ["a", "b", "c"]


def test_a_sequence_that_cannot_grow_preempts_itself_when_all_others_are_scheduled() -> None:
    sim = Sim(num_blocks=4, block_size=2, max_num_batched_tokens=32)
    a = sim.add("a", prompt(0, 3), max_tokens=2)
    b = sim.add("b", prompt(100, 4), max_tokens=2)
    assert plan(sim.step()) == [("a", 3), ("b", 4)]
    out = sim.step()  # a fits in its 2 blocks; b needs a 3rd with none free
    assert plan(out) == [("a", 1)] and out.preempted == [b]
    assert a.is_finished
    sim.run()
    assert b.is_finished and b.num_output_tokens == 2 and b.num_preemptions == 1


def test_prompt_larger_than_the_pool_raises() -> None:
    sim = Sim(num_blocks=2, block_size=4)
    sim.add("huge", prompt(0, 12), max_tokens=1)
    with pytest.raises(RuntimeError, match="needs more KV blocks than the pool has"):
        sim.sched.schedule()


def test_prompt_larger_than_free_blocks_waits_while_others_run() -> None:
    sim = Sim(num_blocks=3, block_size=4)
    sim.add("a", prompt(0, 4), max_tokens=1)
    sim.add("b", prompt(100, 12), max_tokens=1)
    assert plan(sim.step()) == [("a", 4)]  # b waits, no error
    assert plan(sim.step()) == [("b", 12)]
    assert not sim.sched.has_unfinished()


def test_prompt_waits_while_reservations_hold_the_pool() -> None:
    sim = Sim(num_blocks=4, block_size=4)
    reservation = sim.bm.allocate_blocks(3)  # KV on its way from a prefill worker
    assert reservation == [0, 1, 2]
    sim.add("local", prompt(0, 8), max_tokens=1)  # 2 blocks: fits the pool, not the free list
    assert sim.sched.schedule().is_empty  # waits instead of raising
    sim.bm.free_blocks(reservation)
    assert plan(sim.step()) == [("local", 8)]


def test_remove_waiting_and_running_sequences_frees_their_blocks() -> None:
    sim = Sim(num_blocks=8, block_size=4, max_num_seqs=1)
    a = sim.add("a", prompt(0, 6), max_tokens=10)
    b = sim.add("b", prompt(100, 6), max_tokens=10)
    sim.step()
    assert sim.sched.running == [a] and list(sim.sched.waiting) == [b]
    assert sim.bm.num_free_blocks == 6
    sim.sched.remove(b)
    assert sim.sched.num_waiting == 0
    sim.sched.remove(a)
    assert sim.sched.num_running == 0 and a.block_table == []
    assert sim.bm.num_free_blocks == 8
    assert not sim.sched.has_unfinished()
    assert sim.sched.schedule().is_empty
    sim.bm.check_invariants([])


def test_prefix_hit_skips_cached_tokens() -> None:
    sim = Sim(num_blocks=16, block_size=4, max_num_batched_tokens=64)
    shared = prompt(0, 8)
    sim.add("a", shared + [50, 51], max_tokens=1)
    sim.run()
    b = sim.add("b", shared + [60], max_tokens=1)
    assert plan(sim.step()) == [("b", 1)] and sim.completed == ["b"]
    assert b.num_cached_tokens == 8
    assert sim.bm.stats.hits == 8


def test_num_queued_tokens() -> None:
    sim = Sim(num_blocks=8, max_num_seqs=1)
    sim.add("a", prompt(0, 5), max_tokens=3)
    sim.add("b", prompt(100, 7), max_tokens=3)
    assert sim.sched.num_queued_tokens() == 12
    sim.step()
    assert sim.sched.num_queued_tokens() == 7


def test_num_queued_tokens_counts_a_prefill_part_way_through_its_chunks() -> None:
    sim = Sim(num_blocks=16, block_size=4, max_num_batched_tokens=8)
    sim.add("a", prompt(0, 20), max_tokens=2)
    assert sim.sched.num_queued_tokens() == 20
    sim.step()  # the first chunk of 8: a runs with 12 prompt tokens to go
    assert sim.sched.num_running == 1 and sim.sched.num_queued_tokens() == 12
    sim.step()
    sim.step()  # the last chunk of 4, and a's first token
    assert sim.sched.num_queued_tokens() == 0  # decoding: its newest token is not counted


def test_a_blocked_request_is_counted_once_in_prefix_stats() -> None:
    sim = Sim(num_blocks=4, block_size=4, max_num_batched_tokens=32)
    sim.add("a", prompt(0, 8), max_tokens=3)
    sim.add("b", prompt(100, 12), max_tokens=1)  # waits for a's blocks for 3 steps
    sim.run()
    assert sim.bm.stats.queries == 8 + 12


@settings(max_examples=100, deadline=None)
@given(
    requests=st.lists(
        st.tuples(st.integers(1, 12), st.integers(1, 6), st.integers(0, 3)),
        min_size=1,
        max_size=8,
    ),
    num_blocks=st.integers(11, 16),
    max_num_seqs=st.integers(1, 4),
    budget=st.integers(1, 20),
    prefix_caching=st.booleans(),
)
def test_random_workloads_finish_and_return_every_block(
    requests: list[tuple[int, int, int]],
    num_blocks: int,
    max_num_seqs: int,
    budget: int,
    prefix_caching: bool,
) -> None:
    # block_size 2, prompt <= 3 + 12 and max_tokens <= 6: one sequence never needs more
    # than 11 blocks, so (as the engine's max_model_len guarantees) each fits alone.
    sim = Sim(num_blocks, 2, max_num_seqs, budget, prefix_caching)
    seqs = [
        sim.add(f"r{i}", [family] * 3 + prompt(100 * i, n), max_tokens)
        for i, (n, max_tokens, family) in enumerate(requests)
    ]
    while sim.sched.has_unfinished():
        running_decodes = [s for s in sim.sched.running if not s.is_prefilling]
        out = sim.step()
        scheduled = [item.seq for item in out.scheduled]
        if not out.preempted and running_decodes:
            # Decodes come first: a decode only misses a step when the budget ran out.
            first = scheduled[: len(running_decodes)]
            assert first == running_decodes[: len(first)]
            assert len(first) == min(len(running_decodes), budget)
        assert sim.steps < 2000
    assert sorted(s.request_id for s in sim.finished) == sorted(s.request_id for s in seqs)
    for seq, (_, max_tokens, _) in zip(seqs, requests, strict=True):
        assert seq.num_output_tokens == max_tokens
    assert sim.bm.num_free_blocks == num_blocks
    sim.bm.check_invariants([])


def test_a_better_class_is_queued_first_fcfs_within_a_class() -> None:
    sim = Sim(num_blocks=32, max_num_seqs=1, max_num_batched_tokens=32)
    sim.add("run", prompt(0, 3), max_tokens=1, priority=5)
    sim.step()  # "run" finishes; the queue below forms behind it
    for name, priority in (("low1", 3), ("high1", 0), ("low2", 3), ("high2", 0)):
        sim.add(name, prompt(100 * len(name) + priority, 3), max_tokens=1, priority=priority)
    assert [s.request_id for s in sim.sched.waiting] == ["high1", "high2", "low1", "low2"]
    sim.run()
    assert [s.request_id for s in sim.finished] == ["run", "high1", "high2", "low1", "low2"]


def test_a_better_class_takes_a_full_batchs_worst_place_never_the_reverse() -> None:
    sim = Sim(num_blocks=32, max_num_seqs=2, max_num_batched_tokens=32)
    sim.add("a", prompt(0, 3), max_tokens=8, priority=1)
    b = sim.add("b", prompt(100, 3), max_tokens=8, priority=2)
    sim.step()
    sim.step()
    b_outputs = b.output_token_ids
    sim.add("low", prompt(200, 3), max_tokens=2, priority=3)
    assert plan(sim.step()) == [("a", 1), ("b", 1)]  # a worse class waits: no preemption
    vip = sim.add("vip", prompt(300, 3), max_tokens=2, priority=0)
    out = sim.step()
    assert out.preempted == [b]  # the worst class running gives its place
    assert plan(out) == [("vip", 3)]  # and "a" (worse) sits out the prompt's step
    assert plan(sim.step()) == [("a", 1), ("vip", 1)]
    assert [s.request_id for s in sim.sched.waiting] == ["b", "low"]  # b first in its class
    sim.run()
    assert vip.is_finished and b.output_token_ids[:len(b_outputs)] == b_outputs
    assert [s.request_id for s in sim.finished].index("vip") < \
        [s.request_id for s in sim.finished].index("b")


def test_a_preemption_for_blocks_never_takes_a_better_class() -> None:
    sim = Sim(num_blocks=6, block_size=2, max_num_batched_tokens=32)
    hi = sim.add("hi", prompt(0, 3), max_tokens=4, priority=0)
    mid = sim.add("mid", prompt(100, 3), max_tokens=4, priority=1)
    lo = sim.add("lo", prompt(200, 3), max_tokens=4, priority=2)
    sim.step()
    sim.step()
    out = sim.step()  # all need a 3rd block: the worst class goes, however old
    assert out.preempted == [lo]
    # The newest running sequence would be "lo" anyway; make the worst class the oldest:
    sim2 = Sim(num_blocks=6, block_size=2, max_num_batched_tokens=32)
    old_lo = sim2.add("old_lo", prompt(0, 3), max_tokens=4, priority=2)
    sim2.add("new_hi", prompt(100, 3), max_tokens=4, priority=0)
    sim2.add("new_mid", prompt(200, 3), max_tokens=4, priority=1)
    sim2.step()
    sim2.step()
    assert sim2.step().preempted == [old_lo]
    sim.run()
    sim2.run()
    assert [s.request_id for s in sim.finished][:2] == ["hi", "mid"]
    assert mid.num_preemptions == hi.num_preemptions == 0


def test_an_older_worse_decode_does_not_take_the_block_a_better_one_needs() -> None:
    """The older decode of a worse class is planned first and takes the last free block;
    the better decode behind it that needs one takes it back (the worse one leaves the step
    and is preempted), rather than preempting itself."""
    sim = Sim(num_blocks=5, block_size=2, max_num_batched_tokens=32,
              enable_prefix_caching=False, priority_aging_s=0)
    sim.add("lo", prompt(0, 3), max_tokens=4, priority=2)
    sim.step()
    hi = sim.add("hi", prompt(100, 3), max_tokens=4, priority=0)
    sim.step()  # hi's prompt
    preempted = [s.request_id for _ in range(3) for s in sim.step().preempted]
    assert "hi" not in preempted and "lo" in preempted
    sim.run()
    assert [s.request_id for s in sim.finished] == ["hi", "lo"]
    assert hi.num_preemptions == 0


def test_a_better_class_counts_the_cached_blocks_it_takes_from_the_free_queue() -> None:
    """The head of the queue (a better class) hits cached blocks that no sequence holds:
    they sit in the free queue, so taking them uses up free blocks. The room check counted
    them as free of cost, preempted nothing, and the head waited for steps while the worse
    sequence decoded; now the worse one is preempted at once."""
    sim = Sim(num_blocks=5, block_size=4, max_num_seqs=4, max_num_batched_tokens=32,
              priority_aging_s=0)
    shared = prompt(0, 8)
    sim.add("p", [*shared, 50], max_tokens=1, priority=0)
    sim.step()  # p finishes: two cached blocks of `shared`, held by nobody
    low = sim.add("low", prompt(100, 10), max_tokens=6, priority=1)
    sim.step()  # low holds 3 blocks; the 2 free ones are shared's cached blocks
    assert sim.bm.num_free_blocks == 2
    hi = sim.add("hi", [*shared, 60], max_tokens=1, priority=0)
    out = sim.step()
    assert out.preempted == [low]
    assert ("hi", 1) in plan(out)  # its one uncached token, on the cached prefix
    sim.run()
    assert [s.request_id for s in sim.finished][:2] == ["p", "hi"]
    assert hi.num_preemptions == 0


def test_worse_classes_sit_out_a_better_prompts_steps_then_resume() -> None:
    sim = Sim(num_blocks=64, max_num_seqs=4, max_num_batched_tokens=8)
    low = sim.add("low", prompt(0, 3), max_tokens=20, priority=3)
    sim.step()
    chunked = sim.add("chunked", prompt(100, 20), max_tokens=2, priority=3)
    assert plan(sim.step()) == [("low", 1), ("chunked", 7)]  # one class: as before
    hi = sim.add("hi", prompt(200, 12), max_tokens=2, priority=0)
    # hi's prompt (two chunks) has the steps to itself: the low decode and chunk wait.
    assert plan(sim.step()) == [("hi", 8)]
    assert plan(sim.step()) == [("hi", 4)]
    assert plan(sim.step()) == [("low", 1), ("hi", 1), ("chunked", 6)]
    sim.run()
    assert low.is_finished and chunked.is_finished and hi.is_finished
    assert hi.num_preemptions == low.num_preemptions == 0


def test_a_better_class_never_starves_the_others() -> None:
    """Better prompts one after another: worse classes still get a step every
    _MAX_DEFERRED_STEPS + 1."""
    sim = Sim(num_blocks=256, max_num_seqs=8, max_num_batched_tokens=4)
    sim.add("low", prompt(0, 3), max_tokens=30, priority=5)
    sim.step()
    for i in range(6):
        sim.add(f"hi{i}", prompt(1000 + 100 * i, 16), max_tokens=1, priority=0)
    low_steps = []
    for step in range(24):
        if "low" in [rid for rid, _ in plan(sim.step())]:
            low_steps.append(step)
    assert low_steps, "the worse class never ran"
    gaps = [b - a for a, b in zip([-1, *low_steps], low_steps, strict=False)]
    assert max(gaps) <= 5
    assert len(low_steps) < 24  # and the better prompts did get steps of their own


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _class0_stream(sim: Sim, clock: FakeClock, seconds: int) -> list[str]:
    """One better-class request a second, each a step long, for `seconds`: the order in
    which requests finish."""
    for t in range(seconds):
        sim.add(f"hi{t}", prompt(1000 + 10 * t, 3), max_tokens=1, priority=0)
        sim.step()
        clock.now += 1.0
    return [s.request_id for s in sim.finished]


def test_aging_bounds_how_long_a_better_class_delays_a_worse_one() -> None:
    clock = FakeClock()
    sim = Sim(num_blocks=64, max_num_seqs=1, max_num_batched_tokens=32,
              priority_aging_s=4.0, clock=clock)
    sim.add("hi-first", prompt(0, 3), max_tokens=1, priority=0)
    low = sim.add("low", prompt(100, 3), max_tokens=1, priority=2)
    done = _class0_stream(sim, clock, 12)
    # Two classes to make up at 4 s each: class 0 by t=8, then FCFS before later arrivals.
    assert low.is_finished and low.aged_classes == 2 and low.priority == 0
    assert done.index("low") < done.index("hi9")
    assert done.index("low") > done.index("hi6")  # and not before it had aged


def test_without_aging_a_better_stream_holds_a_worse_class_back() -> None:
    clock = FakeClock()
    sim = Sim(num_blocks=64, max_num_seqs=1, max_num_batched_tokens=32,
              priority_aging_s=0.0, clock=clock)
    low = sim.add("low", prompt(100, 3), max_tokens=1, priority=2)
    sim.add("hi-first", prompt(0, 3), max_tokens=1, priority=0)
    _class0_stream(sim, clock, 12)
    assert not low.is_finished and low.priority == 2
    sim.run()
    assert low.is_finished


def test_aging_counts_waiting_time_only_and_keeps_what_was_earned() -> None:
    clock = FakeClock()
    sim = Sim(num_blocks=64, max_num_seqs=1, max_num_batched_tokens=32,
              priority_aging_s=5.0, clock=clock)
    run = sim.add("run", prompt(0, 3), max_tokens=40, priority=3)
    sim.step()
    clock.now = 6.0  # run waited 0 s (admitted at once), then ran 6 s
    vip = sim.add("vip", prompt(100, 3), max_tokens=10, priority=0)
    out = sim.step()
    assert out.preempted == [run] and run.aged_classes == 0 and run.priority == 3
    clock.now = 11.5  # 5.5 s back in the queue: one class earned, none for the running time
    sim.step()
    assert run.aged_classes == 1 and run.priority == 2
    sim.run()
    assert vip.is_finished and run.is_finished


def test_one_class_stays_fcfs_however_long_the_queue_waits() -> None:
    """Aging lifts a sequence only up to the best class present: in one class nothing
    moves, so nothing running is preempted for a long-waiting head."""
    clock = FakeClock()
    sim = Sim(num_blocks=64, max_num_seqs=1, max_num_batched_tokens=32,
              priority_aging_s=1.0, clock=clock)
    first = sim.add("first", prompt(0, 3), max_tokens=5, priority=1)
    second = sim.add("second", prompt(100, 3), max_tokens=5, priority=1)
    sim.step()
    clock.now = 50.0
    out = sim.step()
    assert out.preempted == [] and second.aged_classes == 0 and second.priority == 1
    sim.run()
    assert [s.request_id for s in sim.finished] == ["first", "second"]
    assert first.num_preemptions == 0


def test_priority_aging_must_be_finite_and_non_negative() -> None:
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="priority_aging_s"):
            SchedulerConfig(4, 16, priority_aging_s=bad)


def _running_by_client(sim: Sim) -> dict[str, int]:
    counts: dict[str, int] = {}
    for seq in sim.sched.running:
        counts[seq.client] = counts.get(seq.client, 0) + 1
    return counts


def _add_client(sim: Sim, name: str, client: str, base: int, max_tokens: int = 6) -> Sequence:
    seq = Sequence(name, prompt(base, 3), SamplingParams(max_tokens=max_tokens), client=client)
    sim.sched.add(seq)
    return seq


def test_a_light_client_takes_its_share_of_a_full_batch_at_once() -> None:
    sim = Sim(num_blocks=128, max_num_seqs=4, max_num_batched_tokens=32)
    flood = [_add_client(sim, f"f{i}", "flood", 100 * i, max_tokens=20) for i in range(8)]
    sim.step()
    sim.step()
    assert _running_by_client(sim) == {"flood": 4}
    light = [_add_client(sim, f"l{i}", "light", 5000 + 100 * i) for i in range(3)]
    # Its share of 4 between 2 clients is 2: both places from flood's newest at once.
    out = sim.step()
    assert [s.request_id for s in out.preempted] == ["f3", "f2"]
    assert ("l0", 3) in plan(out) and ("l1", 3) in plan(out)
    assert _running_by_client(sim) == {"flood": 2, "light": 2}
    sim.step()
    assert _running_by_client(sim) == {"flood": 2, "light": 2}  # never past its share
    sim.run()
    assert all(s.is_finished for s in flood + light)
    # Recomputed, not lost: the preempted ones produced all their tokens.
    assert all(s.num_output_tokens == 20 for s in flood)


def test_a_client_below_its_share_is_admitted_before_a_less_served_one() -> None:
    """Places up to a share come first, counters second: a client that got more service
    but runs below its share of the batch still takes a place that frees before a client
    at its share, however little that one was served (else it would wait, preempting
    nothing, until the counters crossed)."""
    sim = Sim(num_blocks=256, max_num_seqs=4, max_num_batched_tokens=64)
    light = [_add_client(sim, f"l{i}", "light", 100 * i, max_tokens=3) for i in range(2)]
    sim.step()  # light runs 2 and is charged; flood joins at light's counter
    flood = [_add_client(sim, f"f{i}", "flood", 1000 + 100 * i, max_tokens=30)
             for i in range(6)]
    sim.step()
    assert _running_by_client(sim) == {"light": 2, "flood": 2}
    for i in range(2, 4):
        _add_client(sim, f"l{i}", "light", 100 * i, max_tokens=3)
    sim.sched.shares.charge("light", 1000, 0)  # light far more served than flood
    while not all(s.is_finished for s in light):
        sim.step()
    sim.step()  # light's places freed: its next two, not flood's waiting ones, take them
    assert _running_by_client(sim) == {"light": 2, "flood": 2}
    sim.run()
    assert all(s.is_finished for s in flood)


def test_a_released_place_is_held_for_its_client_for_the_linger() -> None:
    """A client's sequence finishes; its next request comes a moment later. Within the
    linger the place waits for it (nobody preempted); after it, the place is anybody's."""
    clock = FakeClock()
    sim = Sim(num_blocks=256, max_num_seqs=4, max_num_batched_tokens=64, clock=clock)
    flood = [_add_client(sim, f"f{i}", "flood", 1000 + 100 * i, max_tokens=40)
             for i in range(8)]
    light = [_add_client(sim, f"l{i}", "light", 100 * i, max_tokens=3) for i in range(2)]
    sim.step()
    assert _running_by_client(sim) == {"flood": 2, "light": 2}
    while not all(s.is_finished for s in light):
        sim.step()
    out = sim.step()  # light's two places are held: flood waits, nothing preempted
    assert _running_by_client(sim) == {"flood": 2} and out.preempted == []
    clock.now += 0.05
    _add_client(sim, "l2", "light", 500, max_tokens=3)
    out = sim.step()
    assert _running_by_client(sim) == {"flood": 2, "light": 1} and out.preempted == []
    clock.now += LINGER_S  # the other held place expires: flood may take it
    sim.step()
    assert _running_by_client(sim) == {"flood": 3, "light": 1}
    sim.run()
    assert all(s.is_finished for s in flood)
    assert sim.bm.num_free_blocks == 256


def test_client_weights_set_the_shares_of_the_batch_and_of_the_service() -> None:
    sim = Sim(num_blocks=256, max_num_seqs=4, max_num_batched_tokens=64,
              client_weights=(("gold", 3.0),))
    bronze = [_add_client(sim, f"b{i}", "bronze", 100 * i, max_tokens=30) for i in range(6)]
    sim.step()
    assert _running_by_client(sim) == {"bronze": 4}
    gold = [_add_client(sim, f"g{i}", "gold", 5000 + 100 * i, max_tokens=30) for i in range(6)]
    for _ in range(4):
        sim.step()
    # gold's share of 4 places is 3 (weight 3 of 4), taken one preemption a step.
    assert _running_by_client(sim) == {"gold": 3, "bronze": 1}
    for _ in range(20):
        sim.step()
    assert _running_by_client(sim) == {"gold": 3, "bronze": 1}
    # Counters are service / weight: gold's 3 places grow its counter as fast as bronze's 1.
    gold_counter, bronze_counter = (sim.sched.shares.service(c) for c in ("gold", "bronze"))
    assert abs(gold_counter - bronze_counter) <= 0.2 * bronze_counter
    sim.run()
    assert all(s.is_finished for s in bronze + gold)


def test_weighted_shares_split_places_by_weight() -> None:
    shares = ClientShares({"a": 2.0})
    shares.join("a")
    shares.join("b")
    assert shares.shares(6) == {"a": 4.0, "b": 2.0}
    shares.charge("a", 10, 0)
    shares.charge("b", 10, 0)
    assert shares.service("a") == 5.0 and shares.service("b") == 10.0


def test_the_least_served_client_is_admitted_next_and_idle_time_earns_nothing() -> None:
    sim = Sim(num_blocks=128, max_num_seqs=1, max_num_batched_tokens=32)
    a = [_add_client(sim, f"a{i}", "a", 100 * i, max_tokens=4) for i in range(3)]
    sim.step()  # a0 runs: "a" is charged, "b" arrives later and starts at a's counter
    b = [_add_client(sim, f"b{i}", "b", 1000 + 100 * i, max_tokens=4) for i in range(3)]
    assert sim.sched.shares.service("b") == sim.sched.shares.service("a")
    sim.run()
    order = [s.request_id for s in sim.finished]
    assert order[0] == "a0"
    # Alternating service: never two of one client in a row while the other waits.
    assert order[1:5] in (["b0", "a1", "b1", "a2"], ["a1", "b0", "a2", "b1"])
    assert all(s.is_finished for s in a + b)


def test_without_fair_share_the_queue_is_fcfs_across_clients() -> None:
    sim = Sim(num_blocks=128, max_num_seqs=1, max_num_batched_tokens=32)
    sim.sched.config = SchedulerConfig(1, 32, fair_share=False)
    for i in range(3):
        _add_client(sim, f"a{i}", "a", 100 * i, max_tokens=2)
    sim.step()
    for i in range(2):
        _add_client(sim, f"b{i}", "b", 1000 + 100 * i, max_tokens=2)
    sim.run()
    assert [s.request_id for s in sim.finished] == ["a0", "a1", "a2", "b0", "b1"]


def test_fair_share_never_preempts_a_better_class() -> None:
    sim = Sim(num_blocks=128, max_num_seqs=2, max_num_batched_tokens=32)
    for i in range(2):
        seq = Sequence(f"vip{i}", prompt(100 * i, 3), SamplingParams(max_tokens=10),
                       client="vip", priority=0)
        sim.sched.add(seq)
    sim.step()
    sim.sched.add(Sequence("low", prompt(900, 3), SamplingParams(max_tokens=2),
                           client="other", priority=3))
    out = sim.step()
    assert out.preempted == [] and _running_by_client(sim) == {"vip": 2}


@settings(max_examples=60, deadline=None)
# A preempted sequence whose client was less served than the one it made room for was
# admitted again in the same step (scheduled and preempted at once).
@example(requests=[(6, 1, 0), (1, 1, 0), (1, 2, 1), (1, 2, 1)], num_blocks=11,
         max_num_seqs=2, budget=2)
@given(
    requests=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 6), st.integers(0, 2)),
                      min_size=1, max_size=24),
    num_blocks=st.integers(11, 40),
    max_num_seqs=st.integers(1, 6),
    budget=st.integers(1, 24),
)
def test_random_multi_client_workloads_finish_and_return_every_block(
    requests: list[tuple[int, int, int]], num_blocks: int, max_num_seqs: int, budget: int,
) -> None:
    sim = Sim(num_blocks, 2, max_num_seqs, budget)
    seqs = []
    for i, (n, max_tokens, client) in enumerate(requests):
        seq = Sequence(f"r{i}", prompt(100 * i, n), SamplingParams(max_tokens=max_tokens),
                       client=f"c{client}")
        sim.sched.add(seq)
        seqs.append(seq)
        if i % 3 == 2:
            sim.step()  # clients arrive while others run
    sim.run(max_steps=3000)
    assert all(s.num_output_tokens == s.params.max_tokens for s in seqs)
    assert sim.bm.num_free_blocks == num_blocks
    assert not sim.sched.shares.active
