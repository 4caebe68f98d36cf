"""Paced streams through the real engine (tiny model): greedy output is token-identical
paced and unpaced while the paced ones do sit out steps; the engine loop sleeps until a
paced stream resumes instead of spinning, and never runs it ahead of its pace."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from splitserve.common.outputs import StepOutput
from splitserve.common.sampling_params import SamplingParams
from splitserve.engine.config import EngineConfig
from splitserve.engine.engine_loop import EngineLoop
from splitserve.engine.llm_engine import LLMEngine

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17]]


@pytest.fixture(scope="module")
def engine(tiny_llama: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tiny_llama), num_kv_blocks=64, block_size=8,
                                  max_model_len=256, stream_pace_buffer_s=0.05))


def _run(engine: LLMEngine, paces: list[float]) -> dict[str, list[int]]:
    """Every prompt to completion, stepping as the engine loop does (sleeping while all
    that is left sits out)."""
    outputs: dict[str, list[int]] = {}
    for i, (prompt, pace) in enumerate(zip(PROMPTS, paces, strict=True)):
        engine.add_request(prompt, GREEDY, f"r{i}", stream_pace_tokens_per_s=pace)
        outputs[f"r{i}"] = []
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id] += out.new_token_ids
        if engine.idle_until is not None:
            time.sleep(max(0.0, engine.idle_until - time.monotonic()))
    return outputs


def test_paced_output_is_token_identical_and_steps_are_saved(engine: LLMEngine) -> None:
    plain = _run(engine, [0.0, 0.0, 0.0])
    sat_out = engine.num_paced_sit_outs
    paced = _run(engine, [10.0, 0.0, 25.0])  # slower than any step: they get ahead
    assert paced == plain
    assert all(len(tokens) == 24 for tokens in paced.values())
    assert engine.num_paced_requests == 2
    assert engine.num_paced_sit_outs > sat_out  # the paced ones did sit out
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_bad_paces_are_refused(engine: LLMEngine) -> None:
    for pace in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="stream_pace_tokens_per_s"):
            engine.add_request([5, 6], GREEDY, "bad", stream_pace_tokens_per_s=pace)
    assert not engine.has_unfinished()


def test_the_loop_sleeps_until_a_lone_paced_stream_resumes(engine: LLMEngine) -> None:
    rate, n = 20.0, 16  # slower than any step: it gets ahead
    loop = EngineLoop(engine)
    loop.start()
    times: list[float] = []
    done = threading.Event()

    def sink(out: StepOutput) -> None:
        times.extend(time.monotonic() for _ in out.new_token_ids)
        if out.finished:
            done.set()

    def add(e: LLMEngine) -> None:
        e.add_request([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=n,
                                                ignore_eos=True), "alone",
                      stream_pace_tokens_per_s=rate)
        loop.set_sink("alone", sink)

    try:
        steps_before, idle_before = loop.steps, loop.idle_steps
        loop.call(add)
        assert done.wait(60)
    finally:
        loop.stop()
    assert len(times) == n
    buffer = 2  # ceil(20 tokens/s * 0.05 s) = 1, raised to the floor of 2
    # Never ahead of the pace by more than the buffer: token i no earlier than the
    # reader's time for token i - buffer - 1 (token 0 read on arrival).
    for i in range(buffer + 1, n):
        assert times[i] >= times[0] + (i - buffer - 1) / rate - 0.005
    # One step per token (the prompt's makes the first), and at most one step that
    # finds it sitting out per token: the loop sleeps, it does not spin.
    assert loop.steps - steps_before == n
    assert 0 < loop.idle_steps - idle_before <= n
