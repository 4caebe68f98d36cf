"""The simulator's scheduler against the real Scheduler: the same trace, the same plans."""

from __future__ import annotations

import random

import pytest

from splitserve.common.sampling_params import SamplingParams
from splitserve.engine.block_manager import BlockManager
from splitserve.engine.scheduler import Scheduler, SchedulerConfig
from splitserve.engine.sequence import Sequence, SequenceStatus
from splitserve.sim.scheduler import SimScheduler, SimSequence

Plan = tuple[list[tuple[str, int]], list[str]]


def _trace(seed: int, num: int, max_prompt: int, max_output: int) -> list[tuple[int, int, int]]:
    """(step it arrives before, prompt tokens, max_tokens) per request."""
    rng = random.Random(seed)
    return sorted((rng.randrange(num * 2), rng.randint(1, max_prompt), rng.randint(1, max_output))
                  for _ in range(num))


def run_real(trace: list[tuple[int, int, int]], num_blocks: int, block_size: int,
             max_num_seqs: int, budget: int) -> list[Plan]:
    sched = Scheduler(SchedulerConfig(max_num_seqs, budget),
                      BlockManager(num_blocks, block_size, enable_prefix_caching=False))
    plans: list[Plan] = []
    pending = list(enumerate(trace))
    step = 0
    while pending or sched.has_unfinished():
        while pending and pending[0][1][0] <= step:
            i, (_, prompt, out) = pending.pop(0)
            sched.add(Sequence(f"r{i}", list(range(prompt)), SamplingParams(max_tokens=out),
                               arrival_index=i))
        plan = sched.schedule()
        plans.append(([(s.seq.request_id, s.num_tokens) for s in plan.scheduled],
                      [s.request_id for s in plan.preempted]))
        completing = [s.seq for s in plan.scheduled if s.completes]
        for item in plan.scheduled:
            item.seq.num_computed_tokens += item.num_tokens
        for seq in completing:
            seq.append_token(7)
            if seq.num_output_tokens >= seq.params.max_tokens:
                seq.status = SequenceStatus.FINISHED
                sched.remove(seq)
        step += 1
    return plans


def run_sim(trace: list[tuple[int, int, int]], num_blocks: int, block_size: int,
            max_num_seqs: int, budget: int) -> list[Plan]:
    sched = SimScheduler(num_blocks, block_size, max_num_seqs, budget)
    plans: list[Plan] = []
    pending = list(enumerate(trace))
    step = 0
    while pending or sched.has_work():
        while pending and pending[0][1][0] <= step:
            i, (_, prompt, out) = pending.pop(0)
            sched.add(SimSequence(f"r{i}", prompt, out, arrival_index=i))
        plan = sched.schedule()
        plans.append(([(s.request_id, n) for s, n in plan.scheduled],
                      [s.request_id for s in plan.preempted]))
        for seq in sched.complete(plan):
            if seq.is_done:
                sched.remove(seq)
        step += 1
    return plans


@pytest.mark.parametrize(("seed", "num_blocks", "block_size", "max_num_seqs", "budget"), [
    (0, 64, 4, 4, 32),  # chunked prompts, a few sequences at a time
    (1, 24, 4, 8, 16),  # a small pool: preemption by recompute
    (2, 40, 16, 64, 2048),  # the bench's budget, one step per prompt
    (3, 13, 5, 3, 7),  # odd sizes
])
def test_same_trace_same_plans_step_by_step(seed: int, num_blocks: int, block_size: int,
                                            max_num_seqs: int, budget: int) -> None:
    capacity = num_blocks * block_size
    trace = _trace(seed, 30, max_prompt=min(60, capacity // 2), max_output=min(20, capacity // 4))
    real = run_real(trace, num_blocks, block_size, max_num_seqs, budget)
    sim = run_sim(trace, num_blocks, block_size, max_num_seqs, budget)
    assert len(sim) == len(real)
    for index, (expected, got) in enumerate(zip(real, sim, strict=True)):
        assert got == expected, f"step {index}"


def test_the_small_pool_case_does_preempt() -> None:
    """The comparison above covers preemption (else it could pass without it)."""
    plans = run_real(_trace(1, 30, 48, 20), 24, 4, 8, 16)
    assert sum(len(preempted) for _, preempted in plans) > 0


def test_reserved_blocks_and_add_running() -> None:
    sched = SimScheduler(num_blocks=10, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    seq = SimSequence("r0", num_prompt_tokens=9, max_tokens=3, arrival_index=0)
    assert sched.reserve(seq, 9)
    assert (seq.num_blocks, sched.num_free_blocks) == (3, 7)
    seq.num_computed_tokens, seq.num_tokens = 9, 10
    sched.add_running(seq)
    plan = sched.schedule()
    assert [(s.request_id, n) for s, n in plan.scheduled] == [("r0", 1)]
    assert sched.num_free_blocks == 7  # slot 10 fits the third block
    other = SimSequence("r1", num_prompt_tokens=40, max_tokens=1, arrival_index=1)
    assert not sched.reserve(other, 40)
    assert sched.num_free_blocks == 7
