"""Admission control: slots, FIFO queue with hand-over, rejection, cancellation, draining."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest

from splitserve.router.admission import AdmissionClosedError, AdmissionController, OverCapacityError


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 10))


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_slots_then_reject_when_queue_is_zero() -> None:
    async def body() -> None:
        adm = AdmissionController(max_inflight=2, max_queued=0)
        await adm.acquire()
        await adm.acquire()
        assert (adm.num_inflight, adm.num_queued) == (2, 0)
        with pytest.raises(OverCapacityError, match=r"2 requests in flight \(max_inflight=2\)"):
            await adm.acquire()
        adm.release()
        await adm.acquire()  # the freed slot is usable again
        assert adm.num_inflight == 2

    run(body())


def test_zero_capacity_rejects_everything() -> None:
    async def body() -> None:
        adm = AdmissionController(max_inflight=0, max_queued=0)
        with pytest.raises(OverCapacityError, match="retry later"):
            await adm.acquire()
        assert (adm.num_inflight, adm.num_queued) == (0, 0)

    run(body())


def test_queue_is_fifo_and_slots_pass_straight_to_waiters() -> None:
    async def body() -> None:
        adm = AdmissionController(max_inflight=1, max_queued=2)
        await adm.acquire()
        order: list[str] = []

        async def waiter(name: str) -> None:
            await adm.acquire()
            order.append(name)

        a = asyncio.create_task(waiter("a"))
        await settle()
        b = asyncio.create_task(waiter("b"))
        await settle()
        assert (adm.num_inflight, adm.num_queued) == (1, 2)
        with pytest.raises(OverCapacityError, match="2 queued"):
            await adm.acquire()
        adm.release()
        await settle()
        assert order == ["a"] and (adm.num_inflight, adm.num_queued) == (1, 1)
        adm.release()
        await settle()
        assert order == ["a", "b"] and (adm.num_inflight, adm.num_queued) == (1, 0)
        adm.release()
        assert adm.num_inflight == 0
        await asyncio.gather(a, b)

    run(body())


def test_a_new_request_does_not_overtake_the_queue() -> None:
    async def body() -> None:
        adm = AdmissionController(max_inflight=1, max_queued=1)
        await adm.acquire()
        queued = asyncio.create_task(adm.acquire())
        await settle()
        adm.release()  # handed to the queued request, not left free for a newcomer
        newcomer = asyncio.create_task(adm.acquire())
        await settle()
        assert queued.done() and not newcomer.done()
        assert (adm.num_inflight, adm.num_queued) == (1, 1)
        adm.release()
        await newcomer
        assert (adm.num_inflight, adm.num_queued) == (1, 0)

    run(body())


def test_cancelled_waiter_leaves_the_queue() -> None:
    async def body() -> None:
        adm = AdmissionController(max_inflight=1, max_queued=1)
        await adm.acquire()
        task = asyncio.create_task(adm.acquire())
        await settle()
        assert adm.num_queued == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (adm.num_inflight, adm.num_queued) == (1, 0)
        adm.release()
        assert adm.num_inflight == 0

    run(body())


def test_slot_handed_to_a_waiter_cancelled_meanwhile_is_returned() -> None:
    async def body() -> None:
        adm = AdmissionController(max_inflight=1, max_queued=1)
        await adm.acquire()
        task = asyncio.create_task(adm.acquire())
        await settle()
        adm.release()  # resolves the waiter's future...
        task.cancel()  # ...which is cancelled before it runs again
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (adm.num_inflight, adm.num_queued) == (0, 0)

    run(body())


def test_release_without_acquire_is_an_error() -> None:
    adm = AdmissionController(max_inflight=1, max_queued=0)
    with pytest.raises(RuntimeError):
        adm.release()


def test_close_refuses_new_requests_and_wait_idle_counts_the_rest() -> None:
    async def body() -> None:
        adm = AdmissionController(max_inflight=1, max_queued=1)
        await adm.acquire()
        queued = asyncio.create_task(adm.acquire())
        await settle()
        adm.close()
        with pytest.raises(AdmissionClosedError, match="draining"):
            await adm.acquire()
        assert await adm.wait_idle(0.01) == 2
        adm.release()
        await queued  # a queued request still gets its slot while draining
        assert await adm.wait_idle(0.01) == 1

        async def finish_later() -> None:
            await asyncio.sleep(0.05)
            adm.release()

        finisher = asyncio.create_task(finish_later())
        assert await adm.wait_idle(5.0) == 0
        await finisher

    run(body())


def test_slot_context_manager() -> None:
    async def body() -> None:
        adm = AdmissionController(max_inflight=1, max_queued=0)
        async with adm.slot():
            assert adm.num_inflight == 1
        assert adm.num_inflight == 0
        with pytest.raises(KeyError):
            async with adm.slot():
                raise KeyError("boom")
        assert adm.num_inflight == 0

    run(body())


def test_requests_being_prepared_count_against_the_bound() -> None:
    async def main() -> None:
        adm = AdmissionController(max_inflight=1, max_queued=1)
        with adm.entry(), adm.entry():
            with pytest.raises(OverCapacityError, match="2 queued"), adm.entry():
                pass
        await adm.acquire()  # the places were given back
        with adm.entry():
            pass
        adm.close()
        with pytest.raises(AdmissionClosedError), adm.entry():
            pass
        adm.release()

    asyncio.run(main())


@pytest.mark.parametrize("turns", [0, 1, 2, 3])
def test_a_request_cancelled_as_its_slot_comes_ends_and_gives_the_slot_back(turns: int) -> None:
    """RequestPipeline._acquire with a deadline waits through asyncio.wait_for, which on
    Python 3.11 returns a result that came as the cancel landed and drops the cancel: the
    client went away (aiohttp cancels a handler once), yet its request would hold the slot
    and run to the end. However many loop turns after the hand-over the cancel comes, a
    cancelled request ends cancelled with its slot back."""
    import time

    from splitserve.router.metrics import RouterMetrics
    from splitserve.router.service import RequestPipeline

    async def main() -> None:
        admission = AdmissionController(1, 4)
        pipeline = RequestPipeline(None, admission, RouterMetrics(admission))  # type: ignore[arg-type]
        await admission.acquire()  # the only slot is taken
        task = asyncio.create_task(pipeline._acquire(time.monotonic() + 30, "c", 0, 10, None))
        await asyncio.sleep(0)  # it waits in the queue
        admission.release()  # the slot passes to it
        for _ in range(turns):
            await asyncio.sleep(0)
        if task.cancel():
            with pytest.raises(asyncio.CancelledError):
                await task
            assert admission.num_inflight == 0
        else:  # it had finished: it holds the slot
            await task
            assert admission.num_inflight == 1

    asyncio.run(main())
