"""The router's view of the live workers, and its gRPC channels to them.

Worker loads come from the cluster store, reported by each worker every heartbeat; they
lag. Requests this router sent to a worker after that worker's last report are added on
top (`assign` / `release`), so a burst of requests arriving between two reports spreads
over the workers instead of piling onto the one that looked least loaded.

The usable workers' views live in one RoleIndex per role (router.worker_index), changed a
worker at a time: a store read re-indexes only the workers whose registration or load
report changed (and drops those gone), `assign` / `release` re-index their one worker. A
snapshot() is O(1) plus a store read every `refresh_s`, not a view per worker per request.

Cluster state unreachable (Redis down): the router keeps routing on its last view of the
workers for up to `stale_s` (`degraded` says why), then answers UNAVAILABLE. A refresh
never holds a request longer than _REFRESH_WAIT_S: requests use the last view meanwhile.

Outlier ejection: a worker that just lost a request (its stream broke, its prefill failed
or timed out) is left out of the snapshot for a cooldown that doubles while it keeps
failing (up to _EJECT_MAX_S) and resets on a success, so one dead or wedged worker costs
one request its timeout, not every request until its registration expires. Decode
workers are never all ejected: with every one out, all are offered again.

Channels: one grpc.aio channel per worker address, created on first use and closed once
the address has been absent from the live workers for a while (a worker that missed a
heartbeat may still be finishing streams on it). A worker that registers again at the
same address (a restart: a new started_at) gets a fresh channel at once: the old one may
sit in reconnect backoff for seconds, failing every call with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2_grpc

from splitserve.cluster.store import LiveWorker, WorkerInfo, WorkerRole
from splitserve.common.grpc_guard import aio_channel
from splitserve.common.grpc_util import ServiceError
from splitserve.router.cluster_io import AsyncStore
from splitserve.router.policy import WorkerView
from splitserve.router.worker_index import (
    Assignment,
    ClusterSnapshot,
    PendingWork,
    RoleIndex,
    decode_index,
    prefill_index,
    reference_views,
    view_with,
)
from splitserve.v1 import worker_pb2, worker_pb2_grpc

__all__ = ["Assignment", "ClusterSnapshot", "WorkerDirectory"]

_PREFILL_METHOD = (f"/{worker_pb2.DESCRIPTOR.services_by_name['PrefillWorker'].full_name}"
                   "/Prefill")

log = logging.getLogger(__name__)
# A worker whose connection failed (restarted at the same address, unreachable for a while)
# is dialled again within seconds: gRPC's default reconnect backoff grows to two minutes.
# A dial that gets no answer (a partitioned host drops the SYNs) gives up after 5 s, not
# gRPC's default 20 s (min_reconnect_backoff_ms is also the least time a connection attempt
# is given): a call waiting on it fails, and the request goes to another worker, that much
# sooner. A handshake inside a cluster takes milliseconds; 5 s leaves room for two lost SYNs.
_WORKER_CHANNEL_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 500),
                           ("grpc.min_reconnect_backoff_ms", 5000),
                           ("grpc.max_reconnect_backoff_ms", 3000))

_CHANNEL_LINGER_S = 60.0  # keep a vanished worker's channel this long
_REFRESH_WAIT_S = 0.5  # longest a request waits for a store read it started
_FIRST_READ_WAIT_S = 5.0  # ... for the first read, when the router has no view at all
_EJECT_BASE_S = 5.0  # first cooldown of an ejected worker; doubles per repeated failure
_EJECT_MAX_S = 60.0


@dataclass
class _Ejection:
    failures: int
    until: float  # monotonic


class WorkerDirectory:
    def __init__(self, store: AsyncStore, model_id: str, block_size: int, refresh_s: float,
                 cluster_token: str | None = None, stale_s: float = 30.0,
                 on_decode_worker: Callable[[WorkerInfo], None] | None = None) -> None:
        self._store = store
        # Called with each new registration of a usable worker that decodes (on the loop).
        self._on_decode_worker = on_decode_worker
        self._cluster_token = cluster_token  # sent on every call to a worker
        self._model_id = model_id
        self._block_size = block_size
        self._refresh_s = refresh_s
        self._stale_s = stale_s
        self._live: list[LiveWorker] = []
        self._known: dict[str, LiveWorker] = {}  # worker_id -> its entry of the last read
        self._homes: dict[str, tuple[RoleIndex, ...]] = {}  # ... -> the indexes it is in
        self._ignored: set[str] = set()  # live workers' ids, of another model or block size
        self._decode = decode_index()
        self._prefill = prefill_index()
        self._fetched_at = float("-inf")  # monotonic time of the last successful read
        self._attempted_at = float("-inf")  # ... of the last read started
        self._refreshing: asyncio.Task[None] | None = None
        self.store_error: str | None = None  # why the last read failed; None: it worked
        self._pending: dict[str, list[Assignment]] = {}
        self._work: dict[str, PendingWork] = {}  # worker_id -> its pending work, summed
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._last_seen: dict[str, float] = {}  # address -> monotonic time it was last live
        self._started_at: dict[str, float] = {}  # address -> its live worker's started_at
        self._channel_for: dict[str, float] = {}  # address -> started_at its channel serves
        self._warned: set[str] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self._ejected: dict[str, _Ejection] = {}
        # The snapshot while no worker is ejected (it reads the indexes live: reusable).
        self._plain_snapshot: ClusterSnapshot | None = None
        self._heard_at: dict[str, float] = {}  # address -> monotonic time of its last answer

    # ---- live workers ----------------------------------------------------------------

    @property
    def view_age_s(self) -> float:
        """Seconds since the live workers were last read from the store."""
        return time.monotonic() - self._fetched_at

    async def snapshot(self, force: bool = False) -> ClusterSnapshot:
        """Usable workers, from a store read at most `refresh_s` old (or fresh if `force`).

        While the store is unreachable: the last view, up to `stale_s` old; after that
        ServiceError(UNAVAILABLE)."""
        now = time.monotonic()
        # No view yet (the router has just started): an empty one would tell the caller
        # "no workers" while the first read is still on its way. Wait for it (longer).
        first = self._fetched_at == float("-inf") and self.store_error is None
        wait = False
        if force or now - max(self._fetched_at, self._attempted_at) > self._refresh_s:
            started = self._refreshing is None or self._refreshing.done()
            if started:
                self._attempted_at = now
                self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
            wait = started or force or first
        elif first:
            wait = self._refreshing is not None and not self._refreshing.done()
        if wait:
            assert self._refreshing is not None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._refreshing),
                                       _FIRST_READ_WAIT_S if first else _REFRESH_WAIT_S)
        if self.store_error is not None and self.view_age_s > self._stale_s:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                f"cluster state unreachable for {self.view_age_s:.0f} s (longer than the "
                f"{self._stale_s:g} s the router routes on its last view): {self.store_error}",
            )
        out = frozenset(self.ejected()) if self._ejected else frozenset()
        if not out:  # the common case: one snapshot object serves until a worker is ignored
            plain = self._plain_snapshot
            if plain is None or plain.num_ignored != len(self._ignored):
                plain = self._plain_snapshot = ClusterSnapshot(
                    self._decode, self._prefill, num_ignored=len(self._ignored))
            return plain
        snapshot = ClusterSnapshot(self._decode, self._prefill, out, out, len(self._ignored))
        if out and not snapshot.has_decode():  # every decode worker is out: offer them all
            snapshot = ClusterSnapshot(self._decode, self._prefill, frozenset(), out,
                                       len(self._ignored))
        return snapshot

    # ---- outlier ejection ---------------------------------------------------------------

    def eject(self, worker: WorkerView, why: str) -> None:
        """`worker` just lost a request: leave it out for a (growing) cooldown. Keyed by
        address: the same worker id restarted elsewhere is a fresh worker."""
        previous = self._ejected.get(worker.address)
        now = time.monotonic()
        if previous is not None and previous.until > now:
            return  # already out: requests that lost it together are one failure
        failures = previous.failures + 1 if previous else 1
        cooldown = min(_EJECT_BASE_S * 2 ** (failures - 1), _EJECT_MAX_S)
        self._ejected[worker.address] = _Ejection(failures, now + cooldown)
        log.warning("worker %s at %s left out for %.0f s: %s", worker.worker_id,
                    worker.address, cooldown, why)

    def succeeded(self, worker: WorkerView) -> None:
        """`worker` served a request: forget its failures."""
        if self._ejected.pop(worker.address, None) is not None:
            log.info("worker %s at %s serves again", worker.worker_id, worker.address)

    def heard_from(self, worker: WorkerView) -> None:
        """A call to `worker` just got an answer (a stream message, a response)."""
        self._heard_at[worker.address] = time.monotonic()

    def silent_for(self, worker: WorkerView) -> float:
        """Seconds since any call to `worker` got an answer (inf: never)."""
        return time.monotonic() - self._heard_at.get(worker.address, float("-inf"))

    def ejected(self) -> set[str]:
        """Addresses inside their cooldown now (after it they are offered again, and one
        more failure ejects them for twice as long)."""
        now = time.monotonic()
        for address in [a for a, e in self._ejected.items() if now - e.until > _EJECT_MAX_S]:
            del self._ejected[address]  # long gone, or quiet: start from scratch
        return {a for a, e in self._ejected.items() if e.until > now}

    async def _refresh(self) -> None:
        try:
            live = await self._store.live_workers()
        except Exception as exc:  # noqa: BLE001 - any store failure: keep the last view
            if self.store_error is None:
                log.warning("cluster state unreachable, routing on the last view: %s", exc)
            self.store_error = f"{type(exc).__name__}: {exc}"
            return
        if self.store_error is not None:
            log.info("cluster state reachable again")
        self._live, self._fetched_at, self.store_error = live, time.monotonic(), None
        self._reindex_changed(live)
        self._retire_channels()
        await self._store.sync_prefixes()

    def _reindex_changed(self, live: list[LiveWorker]) -> None:
        """Re-index the workers whose registration or load changed; drop the vanished."""
        seen = set()
        for entry in live:
            wid = entry[0].worker_id
            seen.add(wid)
            known = self._known.get(wid)
            if known is not None and known[0] is entry[0] and known[1] is entry[1]:
                continue  # the same objects (an in-process store): nothing changed
            self._known[wid] = entry
            if known is None or known[0] != entry[0]:
                self._place(wid)
            elif known[1] != entry[1]:
                self._reindex(wid)
        for wid in [wid for wid in self._known if wid not in seen]:
            del self._known[wid]
            self._homes.pop(wid, None)
            self._work.pop(wid, None)
            self._ignored.discard(wid)
            self._decode.remove(wid)
            self._prefill.remove(wid)

    def _place(self, worker_id: str) -> None:
        """Put a worker with a new registration in the indexes of the roles it plays."""
        info = self._known[worker_id][0]
        homes: tuple[RoleIndex, ...] = ()
        if self._usable(info):
            self._ignored.discard(worker_id)
            homes = tuple(index for role, index in ((WorkerRole.DECODE, self._decode),
                                                     (WorkerRole.PREFILL, self._prefill))
                          if info.role.can_serve(role))
            if self._decode in homes and self._on_decode_worker is not None:
                try:
                    self._on_decode_worker(info)
                except Exception:  # noqa: BLE001 - a hook's failure must not unplace it
                    log.exception("on_decode_worker failed for %s", worker_id)
        else:
            self._ignored.add(worker_id)
        for index in (self._decode, self._prefill):
            if index not in homes:
                index.remove(worker_id)
        self._homes[worker_id] = homes
        self._reindex(worker_id)

    def _reindex(self, worker_id: str) -> None:
        """Rebuild a worker's view from its last report and pending work."""
        homes = self._homes.get(worker_id)
        if homes:
            info, load = self._known[worker_id]
            work = self._work.get(worker_id)
            if work is None or work.load is not load:  # a new report: sum its work afresh
                work = self._work[worker_id] = PendingWork(load,
                                                           self._pending.get(worker_id, []))
            view = view_with(info, load, work)
            for index in homes:
                index.put(view)

    def _usable(self, info: WorkerInfo) -> bool:
        problem = ""
        if info.model and info.model != self._model_id:
            problem = f"serves model {info.model!r}, not {self._model_id!r}"
        elif info.block_size != self._block_size:
            problem = f"has block_size {info.block_size}, the router {self._block_size}"
        if problem and info.worker_id not in self._warned:
            self._warned.add(info.worker_id)
            log.warning("ignoring worker %s at %s: it %s", info.worker_id, info.address, problem)
        return not problem

    def reference_views(self) -> tuple[list[WorkerView], list[WorkerView]]:
        """(decode, prefill) views rebuilt from the last read, ejections ignored: what the
        index holds, built the slow way (as every request did before the index)."""
        return reference_views(self._live, self._pending, self._usable)

    # ---- work sent but not yet reported ------------------------------------------------

    def assign(
        self, worker_id: str, *, running: int = 0, blocks: int = 0, queued_tokens: int = 0
    ) -> Assignment:
        assignment = Assignment(worker_id, running, blocks, queued_tokens)
        self._pending.setdefault(worker_id, []).append(assignment)
        self._count(assignment, 1)
        self._reindex(worker_id)
        return assignment

    def _count(self, assignment: Assignment, sign: int) -> None:
        """Add `assignment` to its worker's summed pending work, or take it out (-1).
        (Sums made for an older report are summed afresh by _reindex.)"""
        work = self._work.get(assignment.worker_id)
        if work is not None:
            work.add(assignment, sign)

    def delivered(self, assignment: Assignment) -> None:
        """`assignment`'s worker holds the work now (it answered for it): a load report it
        takes from now on shows the work, one it took before may not. So the work counts
        until a report newer than this moment arrives (PendingWork), however late the
        worker's snapshot is, e.g. through a long prefill step."""
        if assignment in self._pending.get(assignment.worker_id, []):
            self._count(assignment, -1)
            assignment.started_at = time.time()
            self._count(assignment, 1)
            self._reindex(assignment.worker_id)

    def release(self, assignment: Assignment | None) -> None:
        if assignment is None:
            return
        pending = self._pending.get(assignment.worker_id, [])
        if assignment not in pending:
            return
        pending.remove(assignment)
        self._count(assignment, -1)
        if not pending:
            self._pending.pop(assignment.worker_id, None)
        self._reindex(assignment.worker_id)

    # ---- channels ---------------------------------------------------------------------

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = aio_channel(address, self._cluster_token, _WORKER_CHANNEL_OPTIONS)
            self._channels[address] = channel
            self._channel_for[address] = self._started_at.get(address, 0.0)
        self._last_seen[address] = time.monotonic()
        return channel

    def decode_stub(self, worker: WorkerView) -> worker_pb2_grpc.DecodeWorkerStub:
        return worker_pb2_grpc.DecodeWorkerStub(self._channel(worker.address))

    def prefill_stub(self, worker: WorkerView) -> worker_pb2_grpc.PrefillWorkerStub:
        return worker_pb2_grpc.PrefillWorkerStub(self._channel(worker.address))

    def prefill_call(self, worker: WorkerView, request: worker_pb2.PrefillRequest,
                     timeout: float | None) -> grpc.aio.UnaryStreamCall:
        """P.Prefill, called as a server stream of its one answer. The wire is the same as a
        unary call's, but the call's initial metadata (grpc_util.PREFILL_ADMITTED: the
        prompt is queued) arrives as soon as P sends it; a unary call receives it only with
        the answer."""
        method = self._channel(worker.address).unary_stream(
            _PREFILL_METHOD, request_serializer=worker_pb2.PrefillRequest.SerializeToString,
            response_deserializer=worker_pb2.PrefillResponse.FromString)
        return method(request, timeout=timeout)

    def health_stub(self, worker: WorkerView) -> health_pb2_grpc.HealthStub:
        return health_pb2_grpc.HealthStub(self._channel(worker.address))

    def _retire_channels(self) -> None:
        now = time.monotonic()
        for info, _ in self._live:
            self._last_seen[info.address] = now
            self._started_at[info.address] = info.started_at
            serves = self._channel_for.get(info.address)
            if serves == 0.0:  # created before the first refresh saw the worker
                self._channel_for[info.address] = info.started_at
            elif serves is not None and serves != info.started_at:
                log.info("worker %s at %s restarted: new channel", info.worker_id, info.address)
                self._close_channel(info.address)
        for address in list(self._channels):
            if now - self._last_seen.get(address, now) > _CHANNEL_LINGER_S:
                self._close_channel(address)
                self._last_seen.pop(address, None)
                self._started_at.pop(address, None)
                self._heard_at.pop(address, None)

    def _close_channel(self, address: str) -> None:
        channel = self._channels.pop(address)
        self._channel_for.pop(address, None)
        task = asyncio.get_running_loop().create_task(channel.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()
