"""Admission control: a bounded number of requests in flight, and a bounded queue.

A request takes an in-flight slot at once when one is free and nobody is queued; else it
waits in the queue when the queue has room; else it is rejected at once (the router
answers RESOURCE_EXHAUSTED). A released slot passes straight to the waiter that
router.fairness picks: the best priority class (with aging), then the client with the
least service (VTC), then the oldest; with one client and one class, the oldest.
Before that, `entry()` holds a place while the request is validated and tokenized, and
counts it against the same bound: at overload a request is refused before any work is
spent on it, however many arrive at once.

Asyncio-safe: every method runs on the router's event loop thread (the servicer's loop).
The `num_inflight` / `num_queued` reads are plain ints and safe from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Iterator

from splitserve.common.auth import ANONYMOUS
from splitserve.router.fairness import FairShare, Waiter
from splitserve.router.slo import TtftPredictor


class OverCapacityError(Exception):
    """Too many requests in flight and queued; retry later."""


class AdmissionClosedError(Exception):
    """The router is draining and admits nothing new."""


class AdmissionController:
    def __init__(self, max_inflight: int, max_queued: int,
                 fair: FairShare | None = None) -> None:
        if max_inflight < 0 or max_queued < 0:
            raise ValueError("max_inflight and max_queued must be >= 0")
        self.max_inflight = max_inflight
        self.max_queued = max_queued
        self.num_inflight = 0
        self.fair = fair or FairShare()
        self.predictor = TtftPredictor()
        self._waiters: dict[Waiter, asyncio.Future[None]] = {}  # oldest first
        self._seq = itertools.count()
        self._idle: asyncio.Event | None = None  # created lazily on the loop
        self.closed = False
        self.num_entering = 0  # requests inside entry(), not yet acquiring

    @contextlib.contextmanager
    def entry(self) -> Iterator[None]:
        """Hold a place while the request is prepared for acquire().

        Raises AdmissionClosedError / OverCapacityError at once when acquire() would
        refuse the request too, counting requests still being prepared as queued.
        """
        self.check()
        self.num_entering += 1
        try:
            yield
        finally:
            self.num_entering -= 1

    def check(self) -> None:
        """Raise what entry() would raise now (a refusal before any work on the request)."""
        if self.closed:
            raise AdmissionClosedError("router is draining and admits no new requests")
        held = self.num_inflight + len(self._waiters) + self.num_entering
        if held >= self.max_inflight + self.max_queued:
            raise self._over_capacity()

    @property
    def num_queued(self) -> int:
        return len(self._waiters)

    def close(self) -> None:
        """Refuse new requests from now on; those in flight or queued carry on."""
        self.closed = True

    async def acquire(self, client: str = ANONYMOUS, priority: int = 0,
                      prompt_tokens: int = 0, ttft_slo_s: float | None = None
                      ) -> float | None:
        """Take a slot for a request of `client` in class `priority` (lower first), waiting
        in the queue if needed; its prompt tokens are charged to the client once admitted.
        Returns the TTFT predicted for it at arrival (None before any measurement).

        Raises AdmissionClosedError when closed, OverCapacityError when the queue is full,
        SloUnmetError when the predicted TTFT exceeds `ttft_slo_s`. Cancelling the wait
        gives the place (or a slot handed over meanwhile) back.
        """
        if self.closed:
            raise AdmissionClosedError("router is draining and admits no new requests")
        free = self.num_inflight < self.max_inflight and not self._waiters
        if not free and len(self._waiters) >= self.max_queued:
            raise self._over_capacity()
        joining = not free and all(w.client != client for w in self._waiters)
        ahead = 0 if free else self._ahead_of(client, priority, joining)
        if ttft_slo_s is not None:  # refused here, the request leaves no trace
            predicted = self.predictor.check(ttft_slo_s, ahead, self.max_inflight, free)
        else:
            predicted = self.predictor.predict(ahead, self.max_inflight, free)
        if free:
            self.num_inflight += 1
            self.fair.charge(client, prompt_tokens=prompt_tokens)
            return predicted
        if joining:
            self.fair.joined(client, self._waiters)
        waiter = Waiter(client, priority, self.fair.now(), next(self._seq))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[waiter] = future
        try:
            await future
        except asyncio.CancelledError:
            if self._waiters.pop(waiter, None) is not None:
                self._notify_if_idle()
            elif future.done() and not future.cancelled():
                self.release()  # a slot was handed to us just as we were cancelled
            raise
        self.fair.charge(client, prompt_tokens=prompt_tokens)
        return predicted

    def _ahead_of(self, client: str, priority: int, joining: bool) -> int:
        """Waiters likely to be admitted before a new request of `client` in `priority`."""
        mine = (self.fair.counter_on_joining(client, self._waiters) if joining
                else self.fair.counter(client))
        fair = self.fair.config.policy == "vtc"
        return sum(1 for w in self._waiters
                   if w.priority < priority or (w.priority == priority and (
                       not fair or self.fair.counter(w.client) <= mine)))

    def charge(self, client: str, output_tokens: int) -> None:
        """Count output tokens a request of `client` received (fair share)."""
        self.fair.charge(client, output_tokens=output_tokens)

    def _over_capacity(self) -> OverCapacityError:
        queued = len(self._waiters) + self.num_entering
        return OverCapacityError(
            f"router over capacity: {self.num_inflight} requests in flight "
            f"(max_inflight={self.max_inflight}) and {queued} queued "
            f"(max_queued={self.max_queued}); retry later"
        )

    def release(self) -> None:
        """Give a slot back: to the waiter router.fairness picks, or to the pool."""
        while (waiter := self.fair.pick(self._waiters)) is not None:
            future = self._waiters.pop(waiter)
            if not future.done():
                future.set_result(None)  # the slot changes hands; num_inflight unchanged
                return
        if self.num_inflight <= 0:
            raise RuntimeError("release() without a matching acquire()")
        self.num_inflight -= 1
        self._notify_if_idle()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """`async with admission.slot():` holds one slot for the block's duration."""
        await self.acquire()
        try:
            yield
        finally:
            self.release()

    async def wait_idle(self, timeout_s: float) -> int:
        """Wait until nothing is in flight or queued, at most `timeout_s`.

        Returns the number of requests still in flight or queued (0: idle).
        """
        if self._idle is None:
            self._idle = asyncio.Event()
        self._notify_if_idle()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        return self.num_inflight + len(self._waiters)

    def _notify_if_idle(self) -> None:
        if self._idle is None:
            return
        if self.num_inflight == 0 and not self._waiters:
            self._idle.set()
        else:
            self._idle.clear()
