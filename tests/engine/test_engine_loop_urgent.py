"""EngineLoop.submit(urgent=True): a command that runs between two layers of the step in
flight, not after it; plain commands still wait for the step to end."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitserve.common.sampling_params import SamplingParams
from splitserve.engine.config import EngineConfig
from splitserve.engine.engine_loop import EngineLoop
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.scheduler import SchedulerOutput


@pytest.fixture
def loop(tiny_llama: Path) -> Iterator[EngineLoop]:
    engine_loop = EngineLoop(LLMEngine(EngineConfig(model=str(tiny_llama), num_kv_blocks=32)))
    engine_loop.start()
    yield engine_loop
    engine_loop.stop()


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
