"""Fixtures the engine tests share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from splitserve.engine.config import EngineConfig
from splitserve.engine.engine_loop import EngineLoop
from splitserve.engine.llm_engine import LLMEngine


@pytest.fixture
def loop(tiny_llama: Path) -> Iterator[EngineLoop]:
    """A started EngineLoop over the tiny model (32 KV blocks), stopped afterwards."""
    engine_loop = EngineLoop(LLMEngine(EngineConfig(model=str(tiny_llama), num_kv_blocks=32)))
    engine_loop.start()
    yield engine_loop
    engine_loop.stop()
