"""Paced streams in the scheduler (pure Python, a hand-moved clock): a decoding sequence
more than its buffer ahead of its reader sits out steps and keeps its blocks; the others
run; it resumes on time; waiting and preemption count as reading time."""

from __future__ import annotations

import math

import pytest

from splitserve.common.sampling_params import SamplingParams
from splitserve.engine.block_manager import BlockManager
from splitserve.engine.pacing import PaceClock, buffer_tokens
from splitserve.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from splitserve.engine.sequence import Sequence


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class PacedSim:
    """A scheduler and the bookkeeping half of LLMEngine.step(): sampled tokens start and
    move a paced sequence's reader clock at the simulated time, as the engine does."""

    def __init__(self, num_blocks: int = 64, max_num_seqs: int = 8) -> None:
        self.clock = Clock()
        self.bm = BlockManager(num_blocks, 4, enable_prefix_caching=False)
        self.sched = Scheduler(SchedulerConfig(max_num_seqs, 64), self.bm, self.clock)

    def add(self, request_id: str, prompt_len: int = 5, rate: float = 0.0,
            buffer: int = 3) -> Sequence:
        pace = PaceClock(rate, buffer) if rate else None
        seq = Sequence(request_id, list(range(1, prompt_len + 1)),
                       SamplingParams(max_tokens=1000), pace=pace)
        self.sched.add(seq)
        return seq

    def step(self) -> SchedulerOutput:
        out = self.sched.schedule()
        for item in out.scheduled:
            completes = item.completes
            item.seq.num_computed_tokens += item.num_tokens
            if completes:
                item.seq.append_token(7)
                if item.seq.pace is not None:
                    item.seq.pace.on_token(self.clock.now)
        return out


def ids(out: SchedulerOutput) -> list[str]:
    return [item.seq.request_id for item in out.scheduled]


def test_reader_model_follows_the_release_rule() -> None:
    clock = PaceClock(tokens_per_s=10.0, buffer_tokens=2)
    assert clock.resume_time == -math.inf and not clock.sits_out(0.0)
    for _ in range(4):  # four tokens at t=0: read at 0, 0.1, 0.2, 0.3
        clock.on_token(0.0)
    assert clock.read_until == pytest.approx(0.3)
    assert clock.unread_tokens(0.0) == 3  # the first was read on arrival
    assert clock.sits_out(0.0) and clock.sits_out(0.09)
    assert clock.resume_time == pytest.approx(0.1)  # two unread from then on
    assert not clock.sits_out(clock.resume_time)
    clock.on_token(5.0)  # long after the reader caught up: read on arrival
    assert clock.read_until == 5.0 and clock.unread_tokens(5.0) == 0


def test_buffer_tokens_cover_the_buffer_time_with_a_floor() -> None:
    assert buffer_tokens(20.0, 1.0) == 20
    assert buffer_tokens(5.0, 0.5) == 3  # ceil(2.5)
    assert buffer_tokens(1.0, 0.1) == 2


def test_a_paced_sequence_ahead_sits_out_keeps_its_blocks_and_resumes_on_time() -> None:
    sim = PacedSim()
    paced = sim.add("paced", rate=10.0, buffer=3)
    other = sim.add("other")
    sim.step()  # both prompts: first tokens at t=100
    ran = []
    for _ in range(4):  # all at once: the paced one makes its buffer's worth and stops
        ran.append(ids(sim.step()))
    assert ran[:3] == [["paced", "other"]] * 3
    # Four tokens at t=100: read until 100.3, three unread at 100 -> at its buffer; one
    # more makes four (read until 100.4): it sits out until three are left, at 100.1.
    assert ran[3] == ["paced", "other"] and paced.num_output_tokens == 5
    blocks = list(paced.block_table)
    out = sim.step()
    assert ids(out) == ["other"] and out.num_sat_out == 1
    assert out.resume_time == pytest.approx(100.1)
    assert paced.block_table == blocks and paced in sim.sched.running
    sim.clock.now = 100.099
    assert ids(sim.step()) == ["other"]
    sim.clock.now = 100.1
    out = sim.step()
    assert ids(out) == ["paced", "other"] and out.num_sat_out == 0
    assert other.num_output_tokens == 8


def test_alone_it_leaves_an_empty_plan_that_says_when_to_come_back() -> None:
    sim = PacedSim()
    paced = sim.add("paced", rate=20.0, buffer=2)
    while not (out := sim.step()).is_empty:
        pass
    assert out.num_sat_out == 1 and out.resume_time is not None
    assert out.resume_time > sim.clock.now
    assert paced.pace is not None and paced.pace.unread_tokens(sim.clock.now) > 2
    sim.clock.now = out.resume_time
    assert ids(sim.step()) == ["paced"]


def test_in_steady_state_it_steps_at_its_pace() -> None:
    sim = PacedSim()
    paced = sim.add("paced", rate=10.0, buffer=2)
    sim.add("other")
    start = sim.clock.now
    for _ in range(200):  # 10 ms steps for 2 s of wall time
        sim.step()
        sim.clock.now += 0.01
    # 2 s at 10 tokens/s from the first token, plus the buffer and the first: 2*10+2+1
    assert paced.num_output_tokens == pytest.approx(23, abs=1)
    assert sim.clock.now - start == pytest.approx(2.0)


def test_a_prefilling_paced_sequence_is_never_held_back() -> None:
    sim = PacedSim()
    seq = sim.add("paced", prompt_len=9, rate=1.0, buffer=1)
    assert seq.pace is not None
    seq.pace.read_until = sim.clock.now + 60  # far ahead, as after many tokens
    out = sim.step()
    assert ids(out) == ["paced"] and out.num_sat_out == 0  # its prompt is computed


def test_waiting_in_the_queue_counts_as_reading_time() -> None:
    sim = PacedSim(max_num_seqs=1)
    paced = sim.add("paced", rate=10.0, buffer=2)
    sim.step()
    for _ in range(3):
        sim.step()
    assert paced.pace is not None and paced.pace.sits_out(sim.clock.now)
    # It is preempted (recompute) and waits two seconds: its reader read everything.
    sim.sched._preempt(paced)
    sim.clock.now += 2.0
    assert not paced.pace.sits_out(sim.clock.now)
    sim.step()  # recompute: the prompt and its output so far
    before = paced.num_output_tokens
    for _ in range(3):  # behind its reader: it runs every step until ahead again
        assert ids(sim.step()) == ["paced"]
    assert paced.num_output_tokens == before + 3


def test_an_unpaced_batch_is_unchanged() -> None:
    sim = PacedSim()
    a, b = sim.add("a"), sim.add("b")
    for _ in range(20):
        out = sim.step()
        assert ids(out) == ["a", "b"] and out.num_sat_out == 0 and out.resume_time is None
    assert a.num_output_tokens == b.num_output_tokens == 20
