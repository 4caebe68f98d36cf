"""EngineLoop.build: the engine is made on the loop's own thread, which then steps it."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from splitserve.common.sampling_params import SamplingParams
from splitserve.engine.config import EngineConfig
from splitserve.engine.engine_loop import EngineLoop
from splitserve.engine.llm_engine import LLMEngine


def test_the_engine_is_built_and_stepped_on_the_loop_thread(tiny_llama: Path) -> None:
    threads: dict[str, threading.Thread] = {}

    def make() -> LLMEngine:
        threads["built"] = threading.current_thread()
        return LLMEngine(EngineConfig(model=str(tiny_llama), num_kv_blocks=32))

    loop = EngineLoop.build(make)
    assert threads["built"] is not threading.current_thread()
    assert threads["built"].name == "engine-loop" and threads["built"].is_alive()
    loop.start()
    try:
        stepped_on = loop.call(lambda engine: threading.current_thread())
        assert stepped_on is threads["built"]
        done = threading.Event()
        tokens: list[int] = []

        def sink(out: object) -> None:
            tokens.extend(out.new_token_ids)  # type: ignore[attr-defined]
            if out.finished:  # type: ignore[attr-defined]
                done.set()

        def add(engine: LLMEngine) -> None:
            engine.add_request([5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True), "r")
            loop.set_sink("r", sink)

        loop.call(add)
        assert done.wait(30.0) and len(tokens) == 4
    finally:
        loop.stop()
    assert not threads["built"].is_alive()


def test_a_failing_build_raises_to_the_caller_and_an_unstarted_loop_stops() -> None:
    def broken() -> LLMEngine:
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        EngineLoop.build(broken)


def test_stop_before_start_ends_the_built_thread(tiny_llama: Path) -> None:
    loop = EngineLoop.build(lambda: LLMEngine(EngineConfig(model=str(tiny_llama),
                                                           num_kv_blocks=16)))
    thread = loop._thread
    assert thread.is_alive()
    loop.stop(5.0)
    assert not thread.is_alive()
