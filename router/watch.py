"""Is a worker still there? The router's watch over a call that gets no answer.

A frozen worker process (SIGSTOP, a hung host) or a partitioned one closes no socket, so a
call to it just waits. While a call is quiet for STALL_PROBE_S, the worker is probed with a
gRPC health check (answered off its engine thread: a busy worker answers); PROBES_TO_LOSE
probes in a row without an answer within PROBE_TIMEOUT_S, with nothing heard from the
worker on any other call meanwhile, make it lost (WorkerLost). `watched` watches one
awaited answer (a prefill, the Admission); `SilenceWatch` a stream read message by message.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2

from splitserve.router.policy import WorkerView
from splitserve.router.workers import WorkerDirectory

STALL_PROBE_S = 4.0  # a decode stream or a prefill quiet this long: is the worker there?
PROBE_TIMEOUT_S = 3.0
PROBES_TO_LOSE = 2

T = TypeVar("T")


class WorkerLost(Exception):
    """A worker failed the request in a way another worker may not, or handed it back
    while draining (`planned`): resume elsewhere. `channel_only`: only the output channel
    to the worker failed (the worker may be well: it is neither ejected nor avoided)."""

    def __init__(self, role: str, worker: WorkerView, message: str,
                 code: grpc.StatusCode = grpc.StatusCode.INTERNAL, planned: bool = False,
                 kv_tokens: int = 0, channel_only: bool = False) -> None:
        super().__init__(message)
        self.role = role  # "prefill" | "decode"
        self.worker = worker
        self.message = message
        self.code = code
        self.planned = planned
        self.kv_tokens = kv_tokens  # planned: tokens whose KV the worker holds for ShipKV
        self.channel_only = channel_only

    @property
    def reason(self) -> str:
        """The metric label: prefill_lost | decode_lost | decode_drained."""
        return f"{self.role}_{'drained' if self.planned else 'lost'}"


async def watched(pending: Awaitable[T], role: str, worker: WorkerView,
                  probe: Callable[[], Awaitable[object]], directory: WorkerDirectory) -> T:
    """Await a worker's answer. While none comes for STALL_PROBE_S, `probe` it (a gRPC
    health check, answered off the engine thread: a busy worker answers); after
    PROBES_TO_LOSE probes in a row without an answer within PROBE_TIMEOUT_S, and nothing
    heard from the worker on any other call meanwhile: WorkerLost. A frozen process
    (SIGSTOP, a hung host) closes no socket, so nothing else would notice; an overloaded
    one answers slowly but still answers something, and is not taken for a dead one."""
    task = asyncio.ensure_future(pending)
    failed = 0
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=STALL_PROBE_S)
            if done:
                result = task.result()  # (an error is not an answer from the worker)
                directory.heard_from(worker)
                return result
            failed, lost = await _probe_quiet(probe, failed, role, worker, directory)
            if lost is not None and not task.done():
                raise lost
    finally:
        if not task.done():
            task.cancel()  # (cancels the RPC too: the request is leaving this worker)


class SilenceWatch:
    """`watched` for a stream read message by message: one task per stream sleeps until
    the stream has been quiet for STALL_PROBE_S, then probes the worker as `watched`
    does (every STALL_PROBE_S while the quiet lasts). When the worker is judged lost it
    sets `lost` and cancels the call; the reader turns the read's end into `lost`."""

    def __init__(self, call: grpc.aio.Call, role: str, worker: WorkerView,
                 probe: Callable[[], Awaitable[object]], directory: WorkerDirectory) -> None:
        self.lost: WorkerLost | None = None
        self._call, self._role, self._worker = call, role, worker
        self._probe, self._directory = probe, directory
        self._quiet_since = time.monotonic()  # the last message, or the last probe's end
        self._task = asyncio.get_running_loop().create_task(self._run())

    def heard(self) -> None:
        """A message came on the stream."""
        self._quiet_since = time.monotonic()
        self._directory.heard_from(self._worker)

    def stop(self) -> None:
        self._task.cancel()

    async def _run(self) -> None:
        failed = 0
        while True:
            wait = self._quiet_since + STALL_PROBE_S - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            failed, lost = await _probe_quiet(self._probe, failed, self._role, self._worker,
                                              self._directory)
            if lost is not None and not self._call.done():
                self.lost = lost
                self._call.cancel()
                return
            self._quiet_since = max(self._quiet_since, time.monotonic())


async def _probe_quiet(probe: Callable[[], Awaitable[object]], failed: int, role: str,
                       worker: WorkerView, directory: WorkerDirectory
                       ) -> tuple[int, WorkerLost | None]:
    """One probe of a quiet worker, `failed` probes in a row having gone unanswered: the
    count after it, and WorkerLost once it reaches PROBES_TO_LOSE (a worker heard from on
    any other call within the last probe's span is slow, not gone: the count restarts)."""
    try:
        await probe()
        return 0, None
    except grpc.aio.AioRpcError as exc:
        if directory.silent_for(worker) < STALL_PROBE_S + PROBE_TIMEOUT_S:
            return 0, None
        failed += 1
        if failed < PROBES_TO_LOSE:
            return failed, None
        lost = WorkerLost(role, worker, f"{role} worker {worker.worker_id} stopped answering "
                          f"({failed} health probes failed, the last with {exc.code().name})",
                          grpc.StatusCode.UNAVAILABLE)
        lost.__cause__ = exc
        return failed, lost


async def answers_serving(probe: Callable[[], Awaitable[object]]) -> bool:
    """Whether the worker `probe` checks answers SERVING (within the probe's own bound)."""
    try:
        reply = await probe()
    except (grpc.aio.AioRpcError, asyncio.TimeoutError):
        return False
    return getattr(reply, "status", None) == health_pb2.HealthCheckResponse.SERVING


def health_probe(directory: WorkerDirectory, worker: WorkerView
                 ) -> Callable[[], Awaitable[object]]:
    """`worker`'s gRPC health check, bounded by PROBE_TIMEOUT_S: the probe the watches use."""
    stub = directory.health_stub(worker)
    return lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT_S)
