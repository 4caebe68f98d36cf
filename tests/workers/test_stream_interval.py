"""--stream-interval: a decode worker's Admit stream sends tokens N at a time.

The relay (decode_worker.servicer._relay) is driven by a real DecodeRequest whose events a
thread produces like the engine loop does; then end to end through a router, prefill and
decode workers (real gRPC): the same greedy tokens as the engine, in fewer chunks."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitserve.client import Client
from splitserve.common.outputs import StepOutput
from splitserve.common.sampling_params import SamplingParams
from splitserve.decode_worker.servicer import _relay
from splitserve.decode_worker.worker import DecodeEvent, DecodeRequest
from splitserve.llm import LLM
from splitserve.v1 import common_pb2, worker_pb2
from splitserve.worker.runtime import WorkerOptions
from tests.service.deployment import Deployment, start_deployment


class _Active:
    """The part of a gRPC servicer context the relay reads."""

    def is_active(self) -> bool:
        return True


def _token(i: int, finished: bool = False) -> DecodeEvent:
    return DecodeEvent(StepOutput("r", [i], "", finished, "length" if finished else None))


def _produce(request: DecodeRequest, events: list[DecodeEvent], gap_s: float,
             first_delay_s: float = 0.0) -> threading.Thread:
    def run() -> None:
        time.sleep(first_delay_s)
        for event in events:
            request.events.put(event)
            time.sleep(gap_s)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _relayed(request: DecodeRequest, interval: int, hold_s: float
             ) -> list[tuple[worker_pb2.DecodeOutput, float]]:
    return [(m.output, time.monotonic()) for m in _relay(request, _Active(), interval, hold_s)]


def _request(**kwargs: float) -> DecodeRequest:
    return DecodeRequest("r", [1, 2, 3], SamplingParams(max_tokens=16), **kwargs)


def test_tokens_go_in_groups_of_the_interval_after_the_first() -> None:
    request = _request()
    request.events.put(_token(0))
    relay = _relay(request, _Active(), 4, 5.0)
    first = next(relay).output  # taken before the next token exists: alone, at once
    _produce(request, [_token(i, finished=i == 14) for i in range(1, 15)], gap_s=0.01)
    messages = [first, *(m.output for m in relay)]
    sizes = [len(m.token_ids) for m in messages]
    assert [t for m in messages for t in m.token_ids] == list(range(15))
    assert sizes[0] == 1  # the first token at once
    assert all(size >= 4 for size in sizes[1:-1]), sizes  # never a partial group mid-stream
    assert len(messages) <= 5, sizes
    assert messages[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert [m.num_generated_tokens for m in messages] == [
        sum(sizes[: i + 1]) for i in range(len(sizes))]


def test_an_engine_error_reaches_the_router_with_its_message() -> None:
    request = _request()
    request.events.put(_token(0))
    request.events.put(DecodeEvent(StepOutput("r", [7], "", True, "error",
                                              error="token 7 does not follow the grammar")))
    messages = [m for m, _ in _relayed(request, 1, hold_s=0.1)]
    assert messages[-1].finish_reason == common_pb2.FINISH_REASON_ERROR
    assert messages[-1].error_message == "token 7 does not follow the grammar"


def test_a_partial_group_is_sent_after_the_hold() -> None:
    request = _request()
    first, second = _token(0), _token(1)
    request.events.put(first)
    request.events.put(second)  # queued together with the first: one message
    start = time.monotonic()
    _produce(request, [_token(2), _token(3, finished=True)], gap_s=0.6, first_delay_s=0.3)
    relayed = _relayed(request, 8, hold_s=0.1)
    sizes = [len(m.token_ids) for m, _ in relayed]
    assert sizes == [2, 1, 1], sizes
    # Token 2 (queued at 0.3 s) waited about the hold, not for token 3 (queued at 0.9 s).
    assert relayed[1][1] - start < 0.75, relayed[1][1] - start


@pytest.mark.parametrize("end", ["error", "migrate"])
def test_an_event_that_ends_the_stream_is_not_held(end: str) -> None:
    request = _request()
    request.events.put(_token(0))
    last = DecodeEvent(error="boom") if end == "error" else DecodeEvent(migrate=True, kv_tokens=4)
    _produce(request, [_token(1), last], gap_s=0.01)
    start = time.monotonic()
    relayed = _relayed(request, 16, hold_s=5.0)
    assert time.monotonic() - start < 2.0
    final = relayed[-1][0]
    assert final.finish_reason in (common_pb2.FINISH_REASON_ERROR, common_pb2.FINISH_REASON_ABORT)
    assert final.migrate == (end == "migrate")
    assert [t for m, _ in relayed for t in m.token_ids] == [0, 1]


def test_a_paced_stream_is_never_grouped() -> None:
    request = _request(stream_pace_tokens_per_s=50.0)
    _produce(request, [_token(i, finished=i == 5) for i in range(6)], gap_s=0.05)
    sizes = [len(m.token_ids) for m, _ in _relayed(request, 4, hold_s=5.0)]
    assert sizes == [1] * 6, sizes


def test_the_interval_is_checked() -> None:
    for bad in (0, 65):
        with pytest.raises(ValueError, match="stream_interval"):
            WorkerOptions(stream_interval=bad)


ENGINE = {"num_kv_blocks": 128, "block_size": 8, "max_num_batched_tokens": 128}
N = 24


@pytest.fixture(scope="module")
def deployment(tiny_llama: Path) -> Iterator[Deployment]:
    d = start_deployment(str(tiny_llama), 1, 1, engine=ENGINE,
                         router={"local_prefill_threshold": 8},
                         worker_options={"stream_interval": 4})
    yield d
    d.stop()


@pytest.mark.parametrize("prompt", [[5, 6, 7], list(range(300, 320))],
                         ids=["local-prefill", "remote-prefill"])
def test_served_tokens_are_the_engines_in_fewer_chunks(deployment: Deployment, tiny_llama: Path,
                                                       prompt: list[int]) -> None:
    llm = LLM(model=str(tiny_llama), num_kv_blocks=128, block_size=8)
    (want,) = llm.generate([prompt], SamplingParams(max_tokens=N, temperature=0.0,
                                                    ignore_eos=True))
    sizes: list[int] = []
    tokens: list[int] = []
    with Client(deployment.address, timeout=60) as client:
        for chunk in client.stream(prompt, max_tokens=N, temperature=0.0, ignore_eos=True):
            if chunk.token_ids:
                sizes.append(len(chunk.token_ids))
                tokens += chunk.token_ids
    assert tokens == want.token_ids
    assert len(sizes) < N // 2, sizes  # grouped (a tiny model's steps are fast: no holds)
    state = deployment.wait_all_blocks_free()
    assert all(free == total for free, total in state.values()), state
