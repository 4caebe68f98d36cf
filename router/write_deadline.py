"""Is the client still reading? The deadline on each write of a request's stream.

A write to the client waits only while the connection's buffers are full; one that waits
`timeout_s` means the client stopped reading, and its stream is cut off (the router's
client_write_timeout_s), so that the decode batch never carries it for long.

`asyncio.timeout` around each write does that with a timer scheduled and cancelled per
chunk, ~6.5 us of the router's CPU per streamed token (of ~0.5 ms). `WriteDeadline` keeps
one timer per stream instead, armed when a write starts and none is armed: when it fires
it cuts off the write still pending since `timeout_s`, or re-arms for the pending one's
deadline, or (no write pending) lapses until the next write arms it again. A write then
costs a clock read and two attribute writes. The cut-off is asyncio.timeout's: the
writing task is cancelled, and the write raises TimeoutError unless someone else cancelled
the task too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class WriteDeadline:
    """Each write through `write()` raises TimeoutError once it has waited `timeout_s`
    (None: writes wait as long as they take). One stream's writes, one at a time (a
    request's chunks go out in order, from its task or its pacer's)."""

    def __init__(self, timeout_s: float | None) -> None:
        self._timeout_s = timeout_s
        self._loop = asyncio.get_running_loop()
        self._started: float | None = None  # loop time the pending write started at
        self._task: asyncio.Task[object] | None = None  # the task writing
        self._timer: asyncio.TimerHandle | None = None
        self._expired = False

    async def write(self, send: Callable[[T], Awaitable[None]], item: T) -> None:
        """await send(item), cut off after timeout_s (TimeoutError)."""
        if self._timeout_s is None:
            await send(item)
            return
        task = asyncio.current_task()
        assert task is not None
        self._task, self._started = task, self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(self._started + self._timeout_s, self._check)
        try:
            await send(item)
        except asyncio.CancelledError:
            if self._expired and task.uncancel() == 0:  # our cancel, and no one else's
                raise TimeoutError(f"a write waited {self._timeout_s:g} s") from None
            raise
        finally:
            self._started = None

    def close(self) -> None:
        """The stream ended: drop the timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        started, timeout_s = self._started, self._timeout_s
        if started is None or timeout_s is None:
            return  # no write pending: the next one arms the timer
        due = started + timeout_s
        if self._loop.time() < due:  # an earlier write ended; this one started later
            self._timer = self._loop.call_at(due, self._check)
            return
        assert self._task is not None
        self._expired = True
        self._task.cancel()
