"""EngineLoop when things go wrong: a command whose caller stopped waiting, a command posted
without waiting, and a step that raises (the loop stops for good and says so; it never dies
silently nor steps an engine in an unknown state)."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import pytest

from splitserve.common.sampling_params import SamplingParams
from splitserve.engine.config import EngineConfig
from splitserve.engine.engine_loop import EngineLoop, EngineStopped
from splitserve.engine.llm_engine import LLMEngine


def _hold(loop: EngineLoop) -> tuple[threading.Event, threading.Event]:
    """A command that keeps the loop thread until released: (it runs, release)."""
    running, release = threading.Event(), threading.Event()

    def wait(_engine: LLMEngine) -> None:
        running.set()
        assert release.wait(10)

    loop.submit(wait)
    assert running.wait(10)
    return running, release


def test_a_command_not_begun_when_its_caller_gives_up_never_runs(loop: EngineLoop) -> None:
    _, release = _hold(loop)
    ran: list[int] = []
    with pytest.raises(FutureTimeout):  # (the builtin TimeoutError from Python 3.11 on)
        loop.call(lambda e: ran.append(1), timeout_s=0.1)
    release.set()
    assert loop.call(lambda e: "after") == "after"  # the loop went past where it was queued
    assert ran == []


def test_a_command_running_when_its_caller_gives_up_is_waited_for(loop: EngineLoop) -> None:
    started = threading.Event()

    def slow(engine: LLMEngine) -> int:
        started.set()
        time.sleep(2.0)
        return engine.block_manager.num_free_blocks

    # Past the timeout the command is running (the idle loop takes it at once; the timeout
    # leaves it a second even on a loaded machine): its result comes back, not a
    # TimeoutError that would leave whatever it did (blocks reserved, a request queued) to
    # nobody.
    before = time.monotonic()
    assert loop.call(slow, timeout_s=1.0) == 32
    assert started.is_set() and time.monotonic() - before >= 2.0


def test_a_posted_command_is_not_waited_for_and_its_failure_is_logged(
        loop: EngineLoop, caplog: pytest.LogCaptureFixture) -> None:
    _, release = _hold(loop)
    done = threading.Event()
    started = time.monotonic()
    loop.post(lambda e: done.set(), "setting")
    loop.post(lambda e: 1 / 0, "dividing")
    assert time.monotonic() - started < 0.5  # the loop thread is held: nothing waited for it
    assert not done.is_set()
    with caplog.at_level(logging.ERROR, logger="splitserve.engine.engine_loop"):
        release.set()
        assert done.wait(10)
        loop.call(lambda e: None)  # after both
    assert [r.getMessage() for r in caplog.records] == ["dividing failed"]
    assert caplog.records[0].exc_info is not None
    assert caplog.records[0].exc_info[0] is ZeroDivisionError


def test_a_posted_command_on_a_stopped_loop_logs_nothing(
        tiny_llama: Path, caplog: pytest.LogCaptureFixture) -> None:
    stopped = EngineLoop(LLMEngine(EngineConfig(model=str(tiny_llama), num_kv_blocks=32)))
    stopped.start()
    stopped.stop()
    with caplog.at_level(logging.ERROR, logger="splitserve.engine.engine_loop"):
        stopped.post(lambda e: None, "too late")
    assert caplog.records == []
    with pytest.raises(EngineStopped, match="engine loop is stopped"):
        stopped.call(lambda e: None)


def test_a_failed_step_stops_the_loop_and_says_why(
        loop: EngineLoop, caplog: pytest.LogCaptureFixture) -> None:
    boom = RuntimeError("injected step failure")
    seen: list[tuple[LLMEngine, BaseException, str]] = []
    outputs: list[object] = []
    loop.on_failure = lambda engine, exc: seen.append(
        (engine, exc, threading.current_thread().name))
    loop.add_output_flush(lambda: outputs.append(loop.failure))

    def failing_step() -> list[object]:
        raise boom

    _, release = _hold(loop)
    loop.engine.step = failing_step  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    loop.submit(lambda e: e.add_request([5, 6, 7], params, "r"))
    queued = loop.submit(lambda e: "never")  # queued behind the request: runs before the step
    with caplog.at_level(logging.CRITICAL, logger="splitserve.engine.engine_loop"):
        release.set()
        assert queued.result(10) == "never"
        loop._thread.join(10)
    assert not loop._thread.is_alive()
    assert loop.failure is boom
    assert seen == [(loop.engine, boom, "engine-loop")]  # once, on the loop thread
    assert outputs[-1] is boom  # what the sinks held still went out, after the failure
    assert "injected step failure" in caplog.text
    with pytest.raises(EngineStopped, match="the engine failed: RuntimeError") as refused:
        loop.call(lambda e: None)
    assert refused.value.__cause__ is boom


def test_commands_queued_when_a_step_fails_fail_too(loop: EngineLoop) -> None:
    in_step, release = threading.Event(), threading.Event()

    def failing_step() -> list[object]:
        in_step.set()
        assert release.wait(10)
        raise RuntimeError("out of memory")

    loop.engine.step = failing_step  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    loop.call(lambda e: e.add_request([5, 6, 7], params, "r"))
    assert in_step.wait(10)
    pending = loop.submit(lambda e: "too late")  # waits for the step, which fails
    release.set()
    with pytest.raises(EngineStopped, match="out of memory"):
        pending.result(10)
