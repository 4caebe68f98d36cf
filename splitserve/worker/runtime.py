"""One worker role played on a WorkerCore (worker.core): the cluster presence, drain,
load reports, stats and metrics both roles share.

A worker is a plain class that also runs as a plain process (`splitserve prefill|decode`)
or inside a Ray actor; nothing here imports ray.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

import grpc

from splitserve.cluster.presence import WorkerPresence
from splitserve.cluster.store import ClusterStore, WorkerInfo, WorkerLoadReport
from splitserve.common.convert.common import layout_to_proto
from splitserve.common.grpc_util import HealthStatus
from splitserve.common.metrics import WorkerStatsSnapshot, worker_registry
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.model_files import model_name
from splitserve.v1 import common_pb2
from splitserve.worker.core import (
    ROLE_PROTO,
    ROLES,
    WORKER_SERVICES,
    WorkerCore,
    WorkerOptions,
    build_kv_backend,
    engine_layout,
    lease_options,
)

__all__ = ["WORKER_SERVICES", "WorkerOptions", "WorkerRuntime", "build_kv_backend",
           "engine_layout", "lease_options"]

log = logging.getLogger(__name__)


class WorkerRuntime:
    """Base of PrefillWorker and DecodeWorker: one role played on a WorkerCore. Subclasses
    add their servicer in _register.

    Without `core` the worker builds and owns one (a plain worker: its servicer is the
    server's). With one (a flippable worker, worker.flip) it plays its role on that core
    until it is drained and released, and the owner routes the role's calls to it."""

    role = "prefill"
    # A role switch (worker.flip): how long this role keeps taking work after leaving the
    # cluster, for routers whose view still has it (see the roles).
    switch_grace_s = 0.0

    def __init__(self, options: WorkerOptions, store: ClusterStore | None = None,
                 core: WorkerCore | None = None) -> None:
        self.options = options
        self._owns_core = core is None
        if core is None:
            worker_id = options.worker_id or f"{self.role}-{uuid.uuid4().hex[:8]}"
            core = WorkerCore(options, worker_id, store, self.role)
        self.core = core
        self.worker_id = core.worker_id
        self.loop = core.loop
        self.engine = core.engine
        self.layout = core.layout
        self.kv = core.kv
        self.store = core.store
        self.draining = threading.Event()
        self.presence: WorkerPresence | None = None
        self._leave_lock = threading.Lock()
        self.metrics_registry = worker_registry(self)
        if self._owns_core:
            core.bind(self._register(core.server))

    def _register(self, server: grpc.Server) -> list[str]:
        """Add the role's servicer to `server`; the names of the services added."""
        raise NotImplementedError

    def register_servicer(self, server: grpc.Server) -> list[str]:
        """Add this role's servicer to a server the core's owner routes (worker.flip)."""
        return self._register(server)

    @property
    def server(self) -> grpc.Server:
        return self.core.server

    @property
    def health(self) -> HealthStatus | None:
        return self.core.health

    @property
    def port(self) -> int:
        return self.core.port

    @property
    def address(self) -> str:
        return self.core.address

    @property
    def started_at(self) -> float:
        return self.core.started_at

    @property
    def kv_endpoint(self) -> str:
        return self.core.kv_endpoint

    @property
    def output_endpoint(self) -> str:
        """Where routers open output channels to this worker ("": nowhere)."""
        return ""

    @property
    def metrics_port(self) -> int | None:
        """The bound metrics port; None while metrics are not served."""
        return self.core.metrics_port

    def serve_metrics(self, port: int = 0) -> int:
        """Serve metrics_registry over HTTP on options.host (idempotent); the bound port."""
        return self.core.serve_metrics(self.metrics_registry, port)

    def start(self) -> WorkerRuntime:
        if self._owns_core:
            if self.options.metrics_port is not None:  # first: a taken port fails first
                self.serve_metrics(self.options.metrics_port)
            self.core.start()
        info = WorkerInfo(
            worker_id=self.worker_id,
            role=ROLES[self.role],
            address=self.address,
            model=model_name(self.options.engine.model),
            block_size=self.engine.block_size,
            num_total_blocks=self.engine.num_blocks,
            kv_endpoint=self.kv_endpoint,
            started_at=self.started_at,
            output_endpoint=self.output_endpoint,
        )
        self.presence = WorkerPresence(
            self.store, info, self.load_report, self.loop.drain_prefix_events,
            ttl_s=self.options.heartbeat_ttl_s, tier_events_fn=self.loop.drain_tier_events,
        )
        self.presence.start()
        self.core.on_engine_failure(self._engine_failed)
        log.info("%s worker %s serving on %s", self.role, self.worker_id, self.address)
        return self

    @property
    def failed(self) -> threading.Event:
        """Set once the engine failed (the worker then takes no work; see fail_in_flight)."""
        return self.core.failed

    def _engine_failed(self, engine: LLMEngine, exc: BaseException) -> None:
        """On the loop thread, once a step failed: take no more work, end every request
        here (fail_in_flight), and leave the cluster (off this thread: a store call)."""
        self.draining.set()
        reason = f"the engine of {self.role} worker {self.worker_id} failed: {exc!r}"
        count = self.fail_in_flight(engine, reason)
        log.error("%s; %d request(s) ended here", reason, count)
        threading.Thread(target=self.leave_cluster, name=f"{self.role}-leave",
                         daemon=True).start()

    def abort(self, request_id: str) -> bool:
        """Abort `request_id` here, between steps; whether this role held it."""
        return self.loop.call(lambda engine: self._abort(engine, request_id))

    def abort_later(self, request_id: str) -> None:
        """Abort `request_id` between steps without waiting: for callbacks on gRPC's own
        thread, which serves every call of the server (a wait there held them all up for
        an engine step)."""
        self.loop.post(lambda engine: self._abort(engine, request_id),
                       f"{self.role} worker {self.worker_id}: aborting {request_id}")

    def _abort(self, engine: LLMEngine, request_id: str) -> bool:
        """On the loop thread: end `request_id` here and free what it holds (subclasses)."""
        raise NotImplementedError

    def fail_in_flight(self, engine: LLMEngine, reason: str) -> int:
        """End every request this role holds, its engine having failed (on the loop
        thread; the engine is not stepped again): each caller sees UNAVAILABLE and the
        router resumes the request elsewhere, as for a worker it lost. How many there were.
        Subclasses override."""
        return 0

    def load_report(self) -> WorkerLoadReport:
        load = self.loop.load
        return WorkerLoadReport(
            num_waiting=load.num_waiting + self.num_pending(),
            num_running=load.num_running,
            num_free_blocks=load.num_free_blocks,
            num_queued_tokens=load.num_queued_tokens,
            step_model=load.step_model,
            # The engine's time, not the heartbeat's: during a long step the snapshot is
            # older than the requests the router sent meanwhile, which it must keep counting.
            updated_at=load.taken_at,
        )

    def num_pending(self) -> int:
        """Requests accepted but not yet in the engine's queues (subclasses override)."""
        return 0

    def load_proto(self) -> common_pb2.WorkerLoad:
        report = self.load_report()
        return common_pb2.WorkerLoad(
            num_waiting=report.num_waiting,
            num_running=report.num_running,
            num_free_blocks=report.num_free_blocks,
            num_total_blocks=self.loop.load.num_total_blocks,
            num_queued_tokens=report.num_queued_tokens,
        )

    def stats_fields(self) -> dict[str, Any]:
        """The fields PrefillStatsResponse and DecodeStatsResponse share."""
        return {
            "worker_id": self.worker_id,
            "role": ROLE_PROTO[self.role],
            "load": self.load_proto(),
            "counters": self.counters_proto(),
            "kv_layout": layout_to_proto(self.layout),
            "draining": self.draining.is_set(),
            "model": self.options.engine.model,
        }

    def counters_proto(self) -> common_pb2.WorkerCounters:
        stats = self.kv.stats()
        load = self.loop.load
        finished = self.loop.finished_counts()
        aborted = finished.get("abort", 0)
        return common_pb2.WorkerCounters(
            kv_transfer_bytes=stats.bytes_sent + stats.bytes_received,
            kv_transfer_ms=stats.seconds * 1000.0,
            kv_transfer_failures=stats.transfers_failed,
            prefix_cache_queried_tokens=load.prefix_queried_tokens,
            prefix_cache_hit_tokens=load.prefix_hit_tokens,
            num_finished_requests=sum(finished.values()) - aborted,
            num_aborted_requests=aborted,
            num_generated_tokens=self.loop.generated_tokens,
        )

    def metrics_snapshot(self) -> WorkerStatsSnapshot:
        """Cumulative stats for the Prometheus collector (any thread)."""
        kv = self.kv.stats()
        load = self.loop.load
        return WorkerStatsSnapshot(
            kv_bytes_sent=kv.bytes_sent, kv_bytes_received=kv.bytes_received,
            kv_seconds=kv.seconds, kv_transfers_ok=kv.transfers_ok,
            kv_transfers_failed=kv.transfers_failed,
            prefix_queried_tokens=load.prefix_queried_tokens,
            prefix_hit_tokens=load.prefix_hit_tokens,
            prefix_tier_hit_tokens=load.prefix_tier_hit_tokens, kv_tiers=load.kv_tiers,
            generated_tokens=self.loop.generated_tokens, engine_steps=self.loop.steps,
            paced_requests=self.loop.num_paced_requests,
            paced_sit_outs=self.loop.num_paced_sit_outs,
            finished=self.loop.finished_counts(), draining=self.draining.is_set(),
        )

    def in_flight(self) -> int:
        load = self.loop.load
        return load.num_waiting + load.num_running + self.num_pending()

    def drain(self, wait_timeout_s: float = 0.0, migrate: bool = False) -> int:
        """Stop accepting work, leave the cluster, optionally wait for in-flight requests.

        `migrate`: hand them to other workers where the role can (a decode worker alone
        being replaced: SIGTERM on its process). Not when the whole deployment drains:
        the others are leaving too."""
        self.draining.set()
        self.leave_cluster()
        deadline = time.monotonic() + wait_timeout_s
        while self.in_flight() and time.monotonic() < deadline:
            if migrate:
                self._drain_step()
            time.sleep(0.05)
        return self.in_flight()

    def _drain_step(self) -> None:
        """Called while draining with `migrate`, every 50 ms until nothing is in flight."""

    def abort_in_flight(self) -> int:
        """Abort every request still here (a role switch whose drain ran out of time);
        how many there were. Subclasses override."""
        return 0

    def leave_cluster(self) -> None:
        """Deregister from cluster state (routers stop sending work within their view's
        refresh); work already sent is still taken until `draining` is set. (Any thread:
        an engine failure leaves from a thread of its own.)"""
        with self._leave_lock:  # (a second caller returns once the first has left)
            presence, self.presence = self.presence, None
            if presence is not None:
                presence.stop(deregister=True)

    def release(self) -> None:
        """Leave the core for the next role: deregister and undo what this role set on
        the shared engine. Subclasses extend it."""
        self.core.remove_engine_failure_handler(self._engine_failed)
        self.leave_cluster()

    def stop(self, grace_s: float = 1.0) -> None:
        self.release()
        if self._owns_core:
            self.core.stop(grace_s)

    def wait(self) -> None:
        self.core.server.wait_for_termination()
