"""The router's half of a paced stream (Andes): releasing the chunks at the asked pace.

The decode worker runs a paced request up to a buffer of tokens ahead of its reader
(engine/pacing.py); the router holds that buffer and hands the client one token per
interval (1 / tokens_per_s): token i is released one interval after token i-1, or when it
arrives if that is later (a late token delays the ones after it instead of letting them
burst out to catch up: the stream stays smooth). The engine models the reader with the
same rule.

Why here and not in the decode worker's relay: the router sees the whole stream (the
prefill worker's first token, every decode worker of a resumed or migrated request), it
is the last hop before the client, and it holds one clock per request across attempts.
The release runs on a task of its own per request, fed through a queue: RequestRun keeps
reading the decode stream as fast as the worker writes it (its stop strings, its stall
probes and the worker's bounded output queue all see the real stream), nothing blocks the
event loop or another request, and a request whose workers are done (finished, a stop
string, an error) frees them at once while its last tokens are still being released. The
final chunk goes out at its place in the pace: the client's stream is smooth to the end,
and the request holds its admission slot until then.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from splitserve.v1 import common_pb2, router_pb2

Emit = Callable[[router_pb2.GenerateResponse], Awaitable[None]]


class PacedEmit:
    """An Emit that releases one request's chunks at `tokens_per_s` (see the module doc).

    Call it with each chunk (it returns at once); drain() waits until the last chunk went
    out; close() drops what is still held (the request was cancelled); flush() sends what
    is held at once (the request's deadline ran out)."""

    def __init__(self, emit: Emit, tokens_per_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not tokens_per_s > 0:
            raise ValueError(f"tokens_per_s must be > 0, got {tokens_per_s}")
        self._emit = emit
        self._interval_s = 1.0 / tokens_per_s
        self._clock = clock
        self._held: asyncio.Queue[router_pb2.GenerateResponse] = asyncio.Queue()
        self._pump: asyncio.Task[None] | None = None
        self._waiting: router_pb2.GenerateResponse | None = None  # taken, not yet sent
        self._next_release: float | None = None  # the earliest time of the next token

    async def __call__(self, chunk: router_pb2.GenerateResponse) -> None:
        if self._pump is None:
            self._pump = asyncio.create_task(self._release_all())
        elif self._pump.done():
            self._pump.result()  # the client's error (it went away), raised to the caller
            raise RuntimeError("chunk after the paced stream's last chunk")
        self._held.put_nowait(chunk)

    async def drain(self) -> None:
        if self._pump is not None:
            await self._pump

    def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()

    async def flush(self) -> None:
        """Stop pacing: what is held goes to the client now, in order."""
        self.close()
        if self._pump is not None:
            try:
                await self._pump
            except asyncio.CancelledError:
                pass
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            await self._emit(waiting)
        while not self._held.empty():
            await self._emit(self._held.get_nowait())

    async def _release_all(self) -> None:
        while True:
            chunk = self._waiting = await self._held.get()
            if chunk.token_ids:
                await self._wait_for_release(len(chunk.token_ids))
            self._waiting = None
            await self._emit(chunk)
            if chunk.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                return

    async def _wait_for_release(self, num_tokens: int) -> None:
        now = self._clock()
        release = now if self._next_release is None else max(now, self._next_release)
        if release > now:
            await asyncio.sleep(release - now)
        self._next_release = release + num_tokens * self._interval_s
