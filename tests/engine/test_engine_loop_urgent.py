"""EngineLoop.submit(urgent=True): a command that runs between two layers of the step in
flight, not after it; plain commands still wait for the step to end."""

from __future__ import annotations

import threading

import pytest

from splitserve.common.sampling_params import SamplingParams
from splitserve.engine.engine_loop import EngineLoop
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.scheduler import SchedulerOutput


def _hold_the_first_layer(engine: LLMEngine) -> tuple[threading.Event, threading.Event,
                                                       list[int]]:
    """A layer hook that, on the first step, waits at layer 0 until released; the layers
    reached so far are recorded."""
    reached, release = threading.Event(), threading.Event()
    layers: list[int] = []

    def build(plan: SchedulerOutput):  # type: ignore[no-untyped-def]
        def hook(layer: int) -> None:
            layers.append(layer)
            if layer == 0 and not release.is_set():
                reached.set()
                assert release.wait(10)

        return hook

    engine.layer_hook_builder = build
    return reached, release, layers


def _start_a_step(loop: EngineLoop) -> None:
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    loop.call(lambda e: e.add_request([5, 6, 7, 8], params, "r"))


def test_an_urgent_command_runs_inside_the_step_in_flight(loop: EngineLoop) -> None:
    reached, release, layers = _hold_the_first_layer(loop.engine)
    num_layers = len(loop.engine.runner.kv_caches)
    _start_a_step(loop)
    assert reached.wait(10)
    seen: list[list[int]] = []
    plain = loop.submit(lambda e: seen.append(["plain", *layers]))
    urgent = loop.submit(lambda e: (seen.append(["urgent", *layers]),
                                    e.reserve_blocks(16))[1], urgent=True)
    release.set()
    blocks = urgent.result(10)
    plain.result(10)
    # The urgent one ran after layer 0, before layer 1 began; the plain one after the
    # whole forward, though it was submitted first.
    assert seen[0] == ["urgent", 0]
    assert seen[1][0] == "plain" and seen[1][1:] == list(range(num_layers))
    assert blocks is not None and len(blocks) == 1
    loop.call(lambda e: e.release_blocks(blocks))


def test_urgent_commands_also_run_between_steps_and_fail_when_stopped(
        loop: EngineLoop) -> None:
    assert loop.call(lambda e: e.block_manager.num_free_blocks, urgent=True) == 32
    loop.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        loop.call(lambda e: 1, urgent=True)


def test_output_flushes_run_after_each_steps_outputs_went_to_their_sinks(
        loop: EngineLoop) -> None:
    """What the sinks of a step's outputs hold back, the loop's output flushes send once
    that step's outputs are all dispatched: before anything else runs on the loop (a
    command a sink submitted included), and once more after commands; a removed flush runs
    no more."""
    events: list[str] = []
    done = threading.Event()

    def sink(out) -> None:  # type: ignore[no-untyped-def]
        events.append(f"{out.request_id}:{len(out.new_token_ids)}")
        loop.submit(lambda e: events.append("command"))
        if out.finished and out.request_id == "b":
            loop.submit(lambda e: done.set())

    def flush() -> None:
        events.append("flush")

    params = SamplingParams(max_tokens=3, ignore_eos=True)

    def add_both(engine: LLMEngine) -> None:
        for rid in ("a", "b"):
            loop.set_sink(rid, sink)
            engine.add_request([5, 6, 7, 8], params, rid)

    loop.add_output_flush(flush)
    loop.call(add_both)
    assert done.wait(30)
    outputs = [i for i, e in enumerate(events) if ":" in e]
    assert len(outputs) == 6  # three tokens each
    for i in outputs:  # after a step's outputs: the flush, then the commands they submitted
        rest = events[i + 1:]
        assert "flush" in rest and (
            "command" not in rest or rest.index("flush") < rest.index("command")), events
    loop.remove_output_flush(flush)
    count = events.count("flush")
    loop.call(lambda e: None)
    assert events.count("flush") == count
