"""The router's pacer (router.pacing.PacedEmit) on a hand-moved clock, and the rules of a
pace (common.stream_pace): numbers, named speeds, and the clear refusals."""

from __future__ import annotations

import asyncio
import math

import pytest

from splitserve.common.stream_pace import (
    MAX_TOKENS_PER_S,
    NAMED_PACES,
    check_stream_pace,
    resolve_stream_pace,
)
from splitserve.router.pacing import PacedEmit
from splitserve.v1 import common_pb2, router_pb2


class FakeTime:
    """A clock that only asyncio.sleep moves (patched in), so release times are exact."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def chunk(*token_ids: int, last: bool = False) -> router_pb2.GenerateResponse:
    out = router_pb2.GenerateResponse(token_ids=token_ids, text="x" * len(token_ids))
    if last:
        out.finish_reason = common_pb2.FINISH_REASON_STOP
    return out


def run_paced(feed: list[tuple[float, router_pb2.GenerateResponse]], rate: float
              ) -> list[tuple[float, list[int], bool]]:
    """Feed chunks at the given arrival times; (release time, tokens, last) per chunk."""
    clock = FakeTime()
    sent: list[tuple[float, list[int], bool]] = []
    real_sleep = asyncio.sleep

    async def fake_sleep(seconds: float) -> None:
        clock.now += seconds
        await real_sleep(0)

    async def emit(out: router_pb2.GenerateResponse) -> None:
        sent.append((clock.now, list(out.token_ids), bool(out.finish_reason)))

    async def body() -> None:
        pacer = PacedEmit(emit, rate, clock)
        for at, out in feed:
            while clock.now < at:  # let the pump run up to the arrival
                await fake_sleep(min(0.001, at - clock.now))
            await pacer(out)
            await real_sleep(0)
        await pacer.drain()

    asyncio.sleep, saved = fake_sleep, asyncio.sleep  # type: ignore[assignment]
    try:
        asyncio.run(body())
    finally:
        asyncio.sleep = saved  # type: ignore[assignment]
    return sent


def test_a_burst_is_released_one_interval_apart_and_the_end_at_its_place() -> None:
    feed = [(0.0, chunk(1)), (0.01, chunk(2)), (0.01, chunk(3)), (0.02, chunk(4, last=True))]
    sent = run_paced(feed, rate=20.0)
    assert [tokens for _, tokens, _ in sent] == [[1], [2], [3], [4]]
    assert [t for t, _, _ in sent] == pytest.approx([0.0, 0.05, 0.10, 0.15], abs=1e-6)
    assert sent[-1][2]


def test_a_late_token_goes_at_once_and_the_next_keep_the_interval() -> None:
    feed = [(0.0, chunk(1)), (0.5, chunk(2)), (0.5, chunk(3)), (0.5, chunk(last=True))]
    sent = run_paced(feed, rate=10.0)
    times = [t for t, _, _ in sent]
    assert times[:3] == pytest.approx([0.0, 0.5, 0.6], abs=1e-6)  # no burst after the stall
    assert times[3] == pytest.approx(times[2], abs=1e-6)  # a tokenless end follows at once


def test_close_drops_and_flush_sends_what_is_held() -> None:
    async def body() -> tuple[list[list[int]], list[list[int]]]:
        dropped: list[list[int]] = []
        flushed: list[list[int]] = []

        async def into(sink: list[list[int]], out: router_pb2.GenerateResponse) -> None:
            sink.append(list(out.token_ids))

        slow = PacedEmit(lambda out: into(dropped, out), 0.5)
        for i in range(3):
            await slow(chunk(i))
        await asyncio.sleep(0.01)
        slow.close()
        await asyncio.sleep(0.01)
        timed_out = PacedEmit(lambda out: into(flushed, out), 0.5)
        for i in range(3):
            await timed_out(chunk(i))
        await asyncio.sleep(0.01)
        await timed_out.flush()
        return dropped, flushed

    dropped, flushed = asyncio.run(body())
    assert dropped == [[0]]  # only the first was due
    assert flushed == [[0], [1], [2]]  # in order, none lost or repeated


def test_a_client_error_reaches_the_next_call() -> None:
    async def body() -> None:
        async def gone(out: router_pb2.GenerateResponse) -> None:
            raise ConnectionError("client went away")

        pacer = PacedEmit(gone, 100.0)
        await pacer(chunk(1))
        await asyncio.sleep(0.01)
        with pytest.raises(ConnectionError):
            await pacer(chunk(2))

    asyncio.run(body())


def test_paces_resolve_from_numbers_and_names() -> None:
    assert resolve_stream_pace(None) == 0.0
    assert resolve_stream_pace(20) == 20.0 and resolve_stream_pace(0.5) == 0.5
    assert resolve_stream_pace("reading") == NAMED_PACES["reading"] == 5.0
    assert resolve_stream_pace(0) == 0.0  # explicitly not paced
    check_stream_pace(MAX_TOKENS_PER_S)


@pytest.mark.parametrize("bad", [-1, math.nan, math.inf, MAX_TOKENS_PER_S + 1, "sprint", True,
                                 [20], {"rate": 20}])
def test_bad_paces_are_refused_with_the_field_named(bad: object) -> None:
    with pytest.raises(ValueError, match="stream_pace"):
        resolve_stream_pace(bad)  # type: ignore[arg-type]
