"""Iteration-level scheduler: continuous batching with chunked prefill and preemption.

Each step spends a token budget (max_num_batched_tokens) over at most max_num_seqs running
sequences. Running sequences that decode (one token each) are served first, so a long
prompt never stalls them; prompt chunks (running, then waiting in FCFS order) get the rest.
When the KV pool runs dry, the newest running sequence is preempted by recompute: its blocks
are freed and it goes back to the front of the queue, to resume later with identical output.

Priority classes (Sequence.priority, lower first): the queue is ordered by class, FCFS
within one; a preemption for blocks takes the newest sequence of the worst class, and never
one of a better class than the sequence that needs the blocks; and a sequence waiting in a
better class than a running one takes its place when the batch is full (max_num_seqs) or
the pool is short. While a better class has prompt tokens to compute (a running prompt, or
the head of the queue with a place in the batch), worse classes sit that step out, decodes
included, so the better class's first token is not shared with their work (their KV stays;
they resume the step after; after _MAX_DEFERRED_STEPS such steps in a row, one step takes
everyone, so a long or endless run of better prompts never starves them). Aging
(SchedulerConfig.priority_aging_s): a waiting sequence's class improves by one per that many
seconds waited, up to the best class present, so a stream of better classes delays a worse
one by a bounded time. With one class all of this is the FCFS behaviour above.

Fair share (Sequence.client, engine/fair_share.py; SchedulerConfig.fair_share): within a
class, the waiting sequence admitted next is a client's below its share of the batch, else
the least-served client's; a client below its share of a full batch takes places from those
above theirs at once (every place it is short, in one step). With one client, FCFS as above.

Paced streams (Sequence.pace, engine/pacing.py): a decoding sequence that is more than its
buffer of tokens ahead of its reader sits out the step. It keeps its blocks and its place
in `running` (it still counts against max_num_seqs, and is a preemption candidate exactly
as an unscheduled running sequence always was: sitting out never makes it one), so the
step is smaller and the others run faster. The plan says how many sat out and when the
first of them resumes, so an engine with nothing else to do sleeps until then. A sequence
with prompt tokens to compute (new, or recomputing after a preemption) never sits out:
it has no token to be ahead with until its prompt is done.
Pure Python: the model runner turns the returned plan into tensors.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from splitserve.engine.block_manager import BlockManager
from splitserve.engine.fair_share import ClientShares
from splitserve.engine.sequence import Sequence, SequenceStatus

_MAX_DEFERRED_STEPS = 4  # steps in a row that worse classes may sit out for better prompts
# Fair share looks this far into the queue for each client's first waiting sequence (a
# client whose sequences all run would otherwise make every admission scan the queue).
_MAX_FAIR_SCAN = 256


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    fair_share: bool = True  # VTC across Sequence.client (engine/fair_share.py)
    # A waiting sequence's class improves by one per this many seconds waited; 0: never.
    priority_aging_s: float = 10.0
    # Fair-share weights by client name (default 1): (name, weight) pairs.
    client_weights: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if not (math.isfinite(self.priority_aging_s) and self.priority_aging_s >= 0):
            raise ValueError(f"priority_aging_s must be a finite number >= 0, "
                             f"got {self.priority_aging_s}")


@dataclass(slots=True)
class ScheduledSequence:
    seq: Sequence
    num_tokens: int  # tokens to compute this step, starting at seq.num_computed_tokens

    @property
    def completes(self) -> bool:
        """After this step every token of the sequence has KV, so it samples a new token."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    num_sat_out: int = 0  # paced sequences ahead of their readers, not scheduled
    resume_time: float | None = None  # when the first of those decodes again

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.block_manager = block_manager
        self.clock = clock  # paced sequences' readers run on it
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # kept in arrival order; the last is the newest
        self._deferred_steps = 0  # steps in a row in which worse classes sat out
        self.shares = ClientShares(dict(config.client_weights), clock=clock)

    # ---- queue management ----------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        if seq.queued_since is None:
            seq.queued_since = self.clock()
        self.shares.join(seq.client)
        self._enqueue(seq, front_of_class=False)

    def _age_waiting(self) -> None:
        """Aging: a waiting sequence's class improves by one per priority_aging_s since it
        was first queued, up to the best class of the sequences here (their own classes,
        before aging), so a steady stream of better classes delays a worse one by a bounded
        time, while one class stays FCFS (an aged sequence never outranks, or preempts, one
        of the class it came up to). The gain is kept while it runs and if it is preempted.
        The queue is re-sorted, stably, when a class changed."""
        aging = self.config.priority_aging_s
        if aging <= 0 or not self.waiting:
            return
        best = min(s.priority + s.aged_classes for s in (*self.waiting, *self.running))
        now = self.clock()
        changed = False
        for seq in self.waiting:
            since = now if seq.queued_since is None else seq.queued_since
            own = seq.priority + seq.aged_classes
            earned = min(int((now - since) // aging), own - best)
            if earned > seq.aged_classes:
                seq.priority = own - earned
                seq.aged_classes = earned
                changed = True
        if changed:
            self.waiting = deque(sorted(self.waiting, key=lambda s: s.priority))

    def _enqueue(self, seq: Sequence, front_of_class: bool) -> None:
        """Into the queue in class order: behind its class (new) or in front of it (back
        from a preemption)."""
        for index, other in enumerate(self.waiting):
            if other.priority > seq.priority or (front_of_class and
                                                 other.priority == seq.priority):
                self.waiting.insert(index, seq)
                return
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence whose KV is already in its (allocated) blocks, e.g. received from a
        prefill worker: it joins the running batch directly."""
        seq.status = SequenceStatus.RUNNING
        self.shares.join(seq.client)
        self.running.append(seq)
        self.running.sort(key=lambda s: s.arrival_index)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues (finished or aborted) and free its blocks."""
        self.detach(seq)
        self.block_manager.free(seq)

    def detach(self, seq: Sequence) -> None:
        """Take a sequence out of the queues; its blocks stay allocated to the caller."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        else:
            return
        self.shares.leave(seq.client)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def num_queued_tokens(self) -> int:
        """Prompt tokens still to compute: the waiting sequences', and those of running
        sequences part way through a chunked prefill (a decoding sequence's newest token
        is not one)."""
        return (sum(s.num_uncomputed_tokens for s in self.waiting)
                + sum(s.num_uncomputed_tokens for s in self.running if s.is_prefilling))

    # ---- the step plan -------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled_ids: set[int] = set()
        self._age_waiting()
        self._make_room_for_a_better_class(out)
        self._make_room_for_a_client(out)
        by_priority = len(out.preempted)
        # Decodes first, then prompt chunks of running sequences, both in arrival order.
        order = [s for s in self.running if not s.is_prefilling]
        order += [s for s in self.running if s.is_prefilling]
        urgent = (self._prefilling_class() if self._deferred_steps < _MAX_DEFERRED_STEPS
                  else None)
        deferred = False
        now = self.clock()
        for seq in order:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this step
            if urgent is not None and seq.priority > urgent:
                deferred = True
                continue  # a better class's prompt goes first, on a step of its own
            if self._sits_out(seq, now, out):
                continue
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            if not self._allocate_or_preempt(seq, num_tokens, scheduled_ids, out):
                continue
            out.scheduled.append(ScheduledSequence(seq, num_tokens))
            scheduled_ids.add(id(seq))
            budget -= num_tokens
        if len(out.preempted) == by_priority:  # the pool was not short this step
            self._admit_waiting(out, budget)
        self._deferred_steps = self._deferred_steps + 1 if deferred else 0
        if self.config.fair_share and self.shares.contended:  # (a lone client's counter
            # needs no upkeep: one that joins it is lifted to it, stale or not)
            for item in out.scheduled:
                prompt = item.seq.is_prefilling  # (the counters move after the step)
                self.shares.charge(item.seq.client, item.num_tokens if prompt else 0,
                                   0 if prompt else item.num_tokens)
        return out

    def _next_waiting(self, share: dict[str, float]) -> Sequence:
        """The waiting sequence to admit next: the head of the queue, or with fair share
        among several clients (`share`: each present client's share of the batch; empty
        without fair share), within the head's class the first one of a client below its
        share if there is one, else of the least-served client (of equally served ones,
        the one running fewer sequences: a client that just joined)."""
        head = self.waiting[0]
        if not share:
            return head
        running = Counter(s.client for s in self.running)

        def key(seq: Sequence) -> tuple[bool, float, int]:
            below = running[seq.client] + 1 <= share[seq.client]
            return not below, self.shares.service(seq.client), running[seq.client]

        chosen, best = head, key(head)
        for seq in self._first_of_each_client():
            if (k := key(seq)) < best:
                chosen, best = seq, k
        return chosen

    def _first_of_each_client(self) -> list[Sequence]:
        """Each client's first waiting sequence of the head's class (within the first
        _MAX_FAIR_SCAN of the queue), in queue order."""
        head = self.waiting[0]
        firsts: list[Sequence] = []
        seen: set[str] = set()
        for index, seq in enumerate(self.waiting):
            if seq.priority != head.priority or index >= _MAX_FAIR_SCAN:
                break
            if seq.client not in seen:
                seen.add(seq.client)
                firsts.append(seq)
                if len(seen) == len(self.shares.active):
                    break  # every client's first in line was seen
        return firsts

    def _make_room_for_a_client(self, out: SchedulerOutput) -> None:
        """The batch is full and clients with sequences waiting run fewer than their share
        of it while others run more: for each place below a share (as many as those clients
        have waiting), the newest sequence of the client most above its share (of the same
        or a worse class) is preempted, all in this step. Admission then takes the clients
        below their share first (_next_waiting), and a preempted client stays at or above
        its own, so it never takes the place back: the batch does not thrash."""
        if not (self.config.fair_share and self.shares.contended and self.waiting):
            return
        places = self.config.max_num_seqs
        if len(self.running) < places:
            return
        head = self.waiting[0]
        running = Counter(s.client for s in self.running)
        waiting = Counter(s.client for s in self.waiting if s.priority == head.priority)
        share = self.shares.shares(places)
        deficit = sum(min(n, math.floor(share[c] - running[c] + 1e-9))
                      for c, n in waiting.items() if running[c] + 1 <= share[c])
        for _ in range(deficit):
            over = [s for s in self.running
                    if running[s.client] > share[s.client] and s.priority >= head.priority]
            if not over:
                return
            victim = max(over, key=lambda s: (running[s.client] - share[s.client],
                                              self.shares.service(s.client), s.arrival_index))
            running[victim.client] -= 1
            self._preempt(victim)
            out.preempted.append(victim)

    def _place_held_for_another(self, seq: Sequence, share: dict[str, float],
                                held: int) -> bool:
        """Fair share: `seq`'s client is at or above its share and the places left are
        the `held` ones, kept for clients that released them a moment ago
        (ClientShares.held_places)."""
        if not held:
            return False
        running = sum(1 for s in self.running if s.client == seq.client)
        if running + 1 <= share[seq.client]:
            return False  # within its own share
        return len(self.running) + 1 + held > self.config.max_num_seqs

    def _prefilling_class(self) -> int | None:
        """The best class with prompt tokens to compute this step: a running prompt, or the
        head of the queue when the batch has a place for it (None: no prompt work)."""
        classes = [s.priority for s in self.running if s.is_prefilling]
        if self.waiting and len(self.running) < self.config.max_num_seqs:
            classes.append(self.waiting[0].priority)
        return min(classes, default=None)

    @staticmethod
    def _sits_out(seq: Sequence, now: float, out: SchedulerOutput) -> bool:
        """A paced decoding sequence ahead of its reader: counted in the plan."""
        pace = seq.pace
        if pace is None or seq.is_prefilling or not pace.sits_out(now):
            return False
        out.num_sat_out += 1
        earliest = math.inf if out.resume_time is None else out.resume_time
        out.resume_time = min(earliest, pace.resume_time)
        return True

    def _make_room_for_a_better_class(self, out: SchedulerOutput) -> None:
        """The head of the queue is of a better class than the worst running sequence, and
        there is no room for it (max_num_seqs, or not the blocks its next chunk needs):
        that running sequence is preempted for it."""
        while self.waiting and self.running:
            head = self.waiting[0]
            worst = max(self.running, key=lambda s: (s.priority, s.arrival_index))
            if worst.priority <= head.priority:
                return
            full = len(self.running) >= self.config.max_num_seqs
            bm = self.block_manager
            match = bm.match_prefix(head)
            cached = len(match)
            first_chunk = min(head.num_tokens - cached * bm.block_size,
                              self.config.max_num_batched_tokens)
            # Blocks loaded from the KV tier need fresh device blocks too, and cached ones no
            # sequence holds come out of the free queue.
            needed = (bm.blocks_needed(cached * bm.block_size + first_chunk)
                      - len(match.device_blocks) + bm.num_revived(match))
            if not full and needed <= bm.num_free_blocks:
                return
            self._preempt(worst)
            out.preempted.append(worst)

    def _allocate_or_preempt(
        self, seq: Sequence, num_tokens: int, scheduled_ids: set[int], out: SchedulerOutput
    ) -> bool:
        while not self.block_manager.allocate_slots(seq, num_tokens):
            victims = [s for s in self.running if id(s) not in scheduled_ids and s is not seq
                       and s.priority >= seq.priority]  # never a better class
            if not victims:
                # Only sequences planned earlier in this step hold what it needs (an older
                # decode of a worse class took the last block): such a one leaves the step,
                # not this better one. (The step's budget keeps its tokens spent: the plan
                # is a little short, never over.)
                planned = [s for s in self.running if id(s) in scheduled_ids
                           and s.priority > seq.priority]
                if planned:
                    victims = [max(planned, key=lambda s: (s.priority, s.arrival_index))]
                    out.scheduled = [i for i in out.scheduled if i.seq is not victims[0]]
                    scheduled_ids.discard(id(victims[0]))
            victim = (max(victims, key=lambda s: (s.priority, s.arrival_index)) if victims
                      else seq)
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        # Aging counts time spent waiting: back in the queue, it goes on from what it earned.
        seq.queued_since = self.clock() - seq.aged_classes * self.config.priority_aging_s
        self._enqueue(seq, front_of_class=True)

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        # Shares and held places stay as they are while this step admits (they move with
        # clients arriving and leaving, and with time), so they are worked out once.
        share: dict[str, float] = {}
        held = 0
        if self.waiting and self.config.fair_share and self.shares.contended:
            share = self.shares.shares(self.config.max_num_seqs)
            held = self.shares.held_places(self.config.max_num_seqs)
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self._next_waiting(share)
            if self._place_held_for_another(seq, share, held):
                break
            computed = self.block_manager.match_prefix(seq)
            num_cached = len(computed) * self.block_manager.block_size
            num_tokens = min(seq.num_tokens - num_cached, budget)
            if not self.block_manager.allocate_slots(seq, num_tokens, computed):
                if self.block_manager.blocks_needed(seq.num_tokens) > self.block_manager.num_blocks:
                    # Nothing will ever free enough blocks: the pool is smaller than this prompt.
                    raise RuntimeError(
                        f"request {seq.request_id} needs more KV blocks than the pool has "
                        f"({self.block_manager.num_blocks})"
                    )
                break
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSequence(seq, num_tokens))
            budget -= num_tokens
