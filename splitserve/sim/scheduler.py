"""One worker's engine in the simulator: the real Scheduler's rules on token counters.

Mirrors `splitserve.engine.scheduler.Scheduler` for one priority class, unpaced requests
and no prefix caching (the `bench disagg` setting); tests/sim/test_sim_scheduler.py runs
both on the same request trace and compares every step's plan. Per step:
1. running sequences that decode (one token each), then running ones with prompt tokens
   left, in `running` order, take min(tokens left, budget) each out of
   max_num_batched_tokens; a sequence whose blocks cannot grow preempts the newest running
   sequence not yet scheduled this step (itself when there is none): its KV is dropped and it
   goes back to the front of the queue to recompute prompt and output so far;
2. when nothing was preempted, waiting sequences are admitted in FCFS order while budget,
   max_num_seqs and free blocks allow, each with its first chunk.
KV is counted in blocks of `block_size` token slots; a step's sequences grow their block
tables to hold every token computed by the step's end.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


@dataclass(slots=True, eq=False)
class SimSequence:
    request_id: str
    num_prompt_tokens: int
    max_tokens: int
    arrival_index: int
    num_tokens: int = 0  # prompt + output so far
    num_computed_tokens: int = 0
    num_blocks: int = 0
    waiting: bool = True

    def __post_init__(self) -> None:
        if not self.num_tokens:
            self.num_tokens = self.num_prompt_tokens

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        return self.num_uncomputed_tokens > 1

    @property
    def is_done(self) -> bool:
        return self.num_output_tokens >= self.max_tokens


@dataclass(slots=True)
class SimStep:
    """One step's plan: (sequence, tokens computed) in the real scheduler's order."""

    scheduled: list[tuple[SimSequence, int]]
    preempted: list[SimSequence]

    @property
    def num_prefill_tokens(self) -> int:
        return sum(n for s, n in self.scheduled if not _is_decode(s, n))

    @property
    def decodes(self) -> list[SimSequence]:
        return [s for s, n in self.scheduled if _is_decode(s, n)]


def _is_decode(seq: SimSequence, num_tokens: int) -> bool:
    """One token that completes the sequence: a decode (or a 1-token prompt tail)."""
    return num_tokens == 1 and seq.num_computed_tokens + 1 == seq.num_tokens


class SimScheduler:
    def __init__(self, num_blocks: int, block_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int) -> None:
        if min(num_blocks, block_size, max_num_seqs, max_num_batched_tokens) < 1:
            raise ValueError("every SimScheduler size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.num_free_blocks = num_blocks
        self.waiting: deque[SimSequence] = deque()
        self.running: list[SimSequence] = []

    def add(self, seq: SimSequence) -> None:
        seq.waiting = True
        self.waiting.append(seq)

    def reserve(self, seq: SimSequence, num_tokens: int) -> bool:
        """Blocks for `num_tokens` slots taken now (a decode worker's Admit for a prompt
        prefilled elsewhere); False, changing nothing, when the pool is short."""
        need = blocks_for(num_tokens, self.block_size) - seq.num_blocks
        if need > self.num_free_blocks:
            return False
        self.num_free_blocks -= max(0, need)
        seq.num_blocks += max(0, need)
        return True

    def add_running(self, seq: SimSequence) -> None:
        """A sequence whose prompt KV arrived into its reserved blocks."""
        seq.waiting = False
        self.running.append(seq)
        self.running.sort(key=lambda s: s.arrival_index)

    def remove(self, seq: SimSequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.num_free_blocks += seq.num_blocks
        seq.num_blocks = 0

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_queued_tokens(self) -> int:
        return sum(s.num_uncomputed_tokens for s in self.waiting)

    def schedule(self) -> SimStep:
        step = SimStep([], [])
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()
        order = [s for s in self.running if not s.is_prefilling]
        order += [s for s in self.running if s.is_prefilling]
        for seq in order:
            if budget == 0:
                break
            if seq.waiting:
                continue  # preempted earlier in this step
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            if not self._grow_or_preempt(seq, num_tokens, scheduled, step):
                continue
            step.scheduled.append((seq, num_tokens))
            scheduled.add(id(seq))
            budget -= num_tokens
        if not step.preempted:
            self._admit_waiting(step, budget)
        return step

    def complete(self, step: SimStep) -> list[SimSequence]:
        """The step ran: counters advance; returns the sequences that sampled a token
        (the sequence is then finished when `is_done`; the caller removes it)."""
        sampled = []
        for seq, num_tokens in step.scheduled:
            seq.num_computed_tokens += num_tokens
            if seq.num_computed_tokens == seq.num_tokens:
                seq.num_tokens += 1
                sampled.append(seq)
        return sampled

    def _grow(self, seq: SimSequence, num_tokens: int) -> bool:
        return self.reserve(seq, seq.num_computed_tokens + num_tokens)

    def _grow_or_preempt(self, seq: SimSequence, num_tokens: int, scheduled: set[int],
                         step: SimStep) -> bool:
        while not self._grow(seq, num_tokens):
            victims = [s for s in self.running if id(s) not in scheduled and s is not seq]
            victim = max(victims, key=lambda s: s.arrival_index) if victims else seq
            self._preempt(victim)
            step.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: SimSequence) -> None:
        self.running.remove(seq)
        self.num_free_blocks += seq.num_blocks
        seq.num_blocks = 0
        seq.num_computed_tokens = 0
        seq.waiting = True
        self.waiting.appendleft(seq)

    def _admit_waiting(self, step: SimStep, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            num_tokens = min(seq.num_tokens, budget)
            if not self._grow(seq, num_tokens):
                if blocks_for(seq.num_tokens, self.block_size) > self.num_blocks:
                    raise RuntimeError(f"request {seq.request_id} needs more KV blocks than "
                                       f"the pool has ({self.num_blocks})")
                break
            self.waiting.popleft()
            seq.waiting = False
            self.running.append(seq)
            step.scheduled.append((seq, num_tokens))
            budget -= num_tokens
