"""WriteDeadline: asyncio.timeout's cut-off on each write of a stream, with one timer per
stream (router.write_deadline)."""

from __future__ import annotations

import asyncio

import pytest

from splitserve.router.write_deadline import WriteDeadline


async def _sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


def test_a_write_that_waits_past_the_deadline_is_cut_off() -> None:
    async def main() -> float:
        deadline = WriteDeadline(0.05)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await deadline.write(_sleep, 5.0)
        return loop.time() - started

    assert 0.05 <= asyncio.run(main()) < 1.0


def test_quick_writes_are_never_cut_off_and_share_one_timer() -> None:
    """Writes of 5 ms for 0.3 s under a 0.05 s deadline: none is cut off, though the
    stream lasts six deadlines; the timer is armed by a write when none is, not per write."""
    async def main() -> tuple[int, int]:
        deadline = WriteDeadline(0.05)
        loop = asyncio.get_running_loop()
        armed = 0
        call_at = loop.call_at

        def counting_call_at(*args, **kwargs):  # type: ignore[no-untyped-def]
            nonlocal armed
            armed += 1
            return call_at(*args, **kwargs)

        loop.call_at = counting_call_at  # type: ignore[method-assign]
        writes = 0
        end = loop.time() + 0.3
        while loop.time() < end:
            await deadline.write(_sleep, 0.005)
            writes += 1
        deadline.close()
        loop.call_at = call_at  # type: ignore[method-assign]
        return writes, armed

    writes, armed = asyncio.run(main())
    assert writes > 20
    # asyncio.sleep arms a timer of its own per write; the deadline adds about one per
    # 0.05 s (each firing re-arms for the write then pending), not one per write.
    assert armed - writes <= 0.3 / 0.05 + 2


def test_a_write_after_a_long_idle_is_not_cut_off() -> None:
    """The timer armed by an earlier write fires while no write is pending: it lapses,
    and a later write gets its own full deadline."""
    async def main() -> None:
        deadline = WriteDeadline(0.05)
        await deadline.write(_sleep, 0.0)
        await asyncio.sleep(0.12)  # the timer fired with nothing pending
        await deadline.write(_sleep, 0.03)  # under the deadline from its own start
        deadline.close()

    asyncio.run(main())


def test_someone_elses_cancel_stays_a_cancel() -> None:
    async def main() -> None:
        deadline = WriteDeadline(10.0)
        task = asyncio.ensure_future(deadline.write(_sleep, 5.0))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        deadline.close()

    asyncio.run(main())


def test_no_deadline_lets_a_write_wait() -> None:
    async def main() -> None:
        deadline = WriteDeadline(None)
        await deadline.write(_sleep, 0.05)
        deadline.close()

    asyncio.run(main())


def test_a_cut_off_write_leaves_the_writer_usable_for_its_exception_path() -> None:
    """The cut-off comes as TimeoutError inside the writing task, which can still await
    (its cancel was consumed, as asyncio.timeout leaves it)."""
    async def main() -> str:
        deadline = WriteDeadline(0.02)
        try:
            await deadline.write(_sleep, 5.0)
        except TimeoutError:
            await asyncio.sleep(0.01)  # not cancelled again
            return "cut off"
        return "not cut off"

    assert asyncio.run(main()) == "cut off"
