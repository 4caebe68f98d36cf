"""What prefill and decode workers share: the engine on its loop thread, the KV transfer
backend, the cluster presence, and the gRPC server's life cycle.

A worker is a plain class that also runs as a plain process (`splitserve prefill|decode`)
or inside a Ray actor; nothing here imports ray.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc

from splitserve.cluster import open_store
from splitserve.cluster.presence import WorkerPresence
from splitserve.cluster.store import ClusterStore, WorkerInfo, WorkerLoadReport, WorkerRole
from splitserve.common import envs
from splitserve.common.auth import ApiKeys
from splitserve.common.convert.common import layout_to_proto
from splitserve.common.grpc_guard import SyncGuardInterceptor
from splitserve.common.grpc_util import add_health_and_reflection, bind, service_name
from splitserve.common.kv_layout import KVLayout
from splitserve.common.metrics import MetricsServer, WorkerStatsSnapshot, worker_registry
from splitserve.engine.config import EngineConfig
from splitserve.engine.engine_loop import EngineLoop
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.model_files import model_name
from splitserve.kvtransfer.base import KVBackend
from splitserve.v1 import common_pb2, worker_pb2

log = logging.getLogger(__name__)

_ROLES = {"prefill": WorkerRole.PREFILL, "decode": WorkerRole.DECODE}
WORKER_SERVICES = (service_name(worker_pb2, "PrefillWorker"),
                   service_name(worker_pb2, "DecodeWorker"))
_ROLE_PROTO = {"prefill": common_pb2.WORKER_ROLE_PREFILL, "decode": common_pb2.WORKER_ROLE_DECODE}


@dataclass(frozen=True)
class WorkerOptions:
    engine: EngineConfig = field(default_factory=EngineConfig)
    worker_id: str | None = None  # None: "<role>-<random>"
    host: str = "127.0.0.1"  # the gRPC server binds here (loopback on one machine)
    port: int = 0  # 0: an ephemeral port
    cluster_url: str | None = None  # grpc://router:port (embedded store), redis://..., None: memory
    kv_backend: str = "torch_dist"  # torch_dist (gloo / NCCL) or inproc (one process)
    # host:port of a KV rendezvous TCPStore the deployment shares (torch_dist); None: this
    # worker hosts its own on `host` (no other process needed to receive KV).
    kv_store: str | None = None
    serve_kv_store: bool = False  # host that shared TCPStore in this process
    kv_timeout_s: float = 30.0  # deadline of one request's KV transfer
    heartbeat_ttl_s: float = 3.0
    # The lease of a caller's calls: a router that stops answering HTTP/2 pings for this long
    # (frozen, partitioned; a dead one closes its sockets at once) has its calls here
    # cancelled, which frees what they reserved (an Admit's KV blocks, a prefill).
    lease_s: float = 20.0
    # Decode workers draining with migration ship running requests' KV to the next worker
    # (False: the next worker recomputes it).
    kv_migration: bool = True
    max_concurrent_rpcs: int = 1024
    # A decode worker's per-request output buffer: a stream whose reader (the router) lets
    # more step outputs than this pile up is cut off and its request aborted, so a stuck
    # reader costs memory and a batch slot for a bounded time only; the engine never waits.
    max_output_backlog: int = 4096
    # Prometheus metrics over HTTP on `host`: 0 an ephemeral port, None not served.
    metrics_port: int | None = None
    # The deployment's shared secret (None: SPLITSERVE_CLUSTER_TOKEN; unset or empty: none):
    # required on every call to this worker's RPCs, sent to the cluster-state server.
    cluster_token: str | None = None

    @property
    def resolved_cluster_token(self) -> str | None:
        return envs.cluster_token(self.cluster_token)

    def __post_init__(self) -> None:
        if self.kv_backend not in ("torch_dist", "inproc"):
            raise ValueError(f"kv_backend must be torch_dist or inproc, got {self.kv_backend!r}")
        if self.serve_kv_store and not self.kv_store:
            raise ValueError("serve_kv_store needs kv_store (the host:port to serve it on)")
        if self.kv_timeout_s <= 0 or self.heartbeat_ttl_s <= 0 or self.lease_s < 0.2:
            raise ValueError("kv_timeout_s and heartbeat_ttl_s must be positive, lease_s >= 0.2")
        if self.max_output_backlog < 1:
            raise ValueError(f"max_output_backlog must be >= 1, got {self.max_output_backlog}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in [0, 65535] or None, got {self.metrics_port}")


def lease_options(lease_s: float) -> list[tuple[str, int]]:
    """Server options that end a silent caller's calls within ~lease_s: ping each connection
    that has calls every lease/2 and close it when a ping goes unanswered for lease/2."""
    half_ms = max(100, int(lease_s * 500))
    return [
        ("grpc.keepalive_time_ms", half_ms),
        ("grpc.keepalive_timeout_ms", half_ms),
        ("grpc.http2.ping_timeout_ms", half_ms),  # grpc >= 1.5x times pings out by this one
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),  # a quiet stream still gets pinged
    ]


def engine_layout(engine: LLMEngine) -> KVLayout:
    arch = engine.arch
    return KVLayout(arch.num_layers, arch.num_kv_heads, arch.head_dim, engine.block_size,
                    engine.runner.kv_layout_dtype)


def build_kv_backend(options: WorkerOptions, worker_id: str, layout: KVLayout,
                     device: str) -> tuple[KVBackend, Any]:
    """The KV backend, and the rendezvous store when this process hosts it (keep it alive)."""
    if options.kv_backend == "inproc":
        from splitserve.kvtransfer.inproc import InProcBackend

        return InProcBackend(worker_id, layout, default_timeout_s=options.kv_timeout_s), None
    from splitserve.kvtransfer.torch_dist import TorchDistBackend, create_rendezvous_store

    if options.kv_store:
        host, _, port_text = options.kv_store.rpartition(":")
        port = int(port_text)
        hosted = create_rendezvous_store(host, port) if options.serve_kv_store else None
    else:  # this worker's own store, on the address its gRPC server binds
        host = options.host or "127.0.0.1"
        hosted = create_rendezvous_store(host, 0)
        port = hosted.port
    # gloo listens on the address this worker serves on (with no address given, gloo's own
    # choice: the host name's address, which in a container or namespace may be loopback).
    bind_host = options.host if options.host not in ("", "0.0.0.0", "::") else None
    backend = TorchDistBackend(
        worker_id, layout, host, port, device, bind_host=bind_host,
        default_timeout_s=options.kv_timeout_s, op_timeout_s=options.kv_timeout_s,
        auth_token=options.resolved_cluster_token,
    )
    return backend, hosted


class WorkerRuntime:
    """Base of PrefillWorker and DecodeWorker. Subclasses add their servicer in _register."""

    role = "prefill"

    def __init__(self, options: WorkerOptions, store: ClusterStore | None = None):
        self.options = options
        self.worker_id = options.worker_id or f"{self.role}-{uuid.uuid4().hex[:8]}"
        # The engine is built on the thread that steps it (EngineLoop.build says why).
        self.loop = EngineLoop.build(lambda: LLMEngine(options.engine))
        self.engine = self.loop.engine
        self.layout = engine_layout(self.engine)
        self.kv, self._kv_store_host = build_kv_backend(
            options, self.worker_id, self.layout, str(self.engine.runner.device)
        )
        token = options.resolved_cluster_token
        self.store = (store if store is not None
                      else open_store(options.cluster_url, token=token))
        self._owns_store = store is None
        self.draining = threading.Event()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=options.max_concurrent_rpcs,
                                       thread_name_prefix=f"{self.role}-rpc"),
            options=[("grpc.so_reuseport", 0), *lease_options(options.lease_s)],
            # Calls need the cluster token (if set); undecodable ones get INVALID_ARGUMENT.
            interceptors=[SyncGuardInterceptor(
                [(ApiKeys.single("cluster", token, "the cluster token"), WORKER_SERVICES)])],
        )
        service_names = self._register(self.server)
        self.health = add_health_and_reflection(self.server, service_names)
        self.port = bind(self.server, f"{options.host}:{options.port}")
        self.address = f"{options.host}:{self.port}"
        self.presence: WorkerPresence | None = None
        self.started_at = time.time()
        self.metrics_registry = worker_registry(self)
        self._metrics_server: MetricsServer | None = None

    def _register(self, server: grpc.Server) -> list[str]:
        raise NotImplementedError

    @property
    def kv_endpoint(self) -> str:
        from splitserve.kvtransfer.torch_dist import TorchDistBackend

        if isinstance(self.kv, TorchDistBackend):
            return self.kv.endpoint
        return f"inproc://{self.worker_id}"

    @property
    def metrics_port(self) -> int | None:
        """The bound metrics port; None while metrics are not served."""
        return None if self._metrics_server is None else self._metrics_server.port

    def serve_metrics(self, port: int = 0) -> int:
        """Serve metrics_registry over HTTP on options.host (idempotent); the bound port."""
        if self._metrics_server is None:
            self._metrics_server = MetricsServer(self.metrics_registry, self.options.host, port)
        return self._metrics_server.port

    def start(self) -> WorkerRuntime:
        if self.options.metrics_port is not None:  # first: a taken port fails before serving
            self.serve_metrics(self.options.metrics_port)
        self.loop.start()
        self.server.start()
        info = WorkerInfo(
            worker_id=self.worker_id,
            role=_ROLES[self.role],
            address=self.address,
            model=model_name(self.options.engine.model),
            block_size=self.engine.block_size,
            num_total_blocks=self.engine.num_blocks,
            kv_endpoint=self.kv_endpoint,
        )
        self.presence = WorkerPresence(
            self.store, info, self.load_report, self.loop.drain_prefix_events,
            ttl_s=self.options.heartbeat_ttl_s, tier_events_fn=self.loop.drain_tier_events,
        )
        self.presence.start()
        log.info("%s worker %s serving on %s", self.role, self.worker_id, self.address)
        return self

    def load_report(self) -> WorkerLoadReport:
        load = self.loop.load
        return WorkerLoadReport(
            num_waiting=load.num_waiting + self.num_pending(),
            num_running=load.num_running,
            num_free_blocks=load.num_free_blocks,
            num_queued_tokens=load.num_queued_tokens,
            step_model=load.step_model,
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
            "role": _ROLE_PROTO[self.role],
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
        if self.presence is not None:
            self.presence.stop(deregister=True)
            self.presence = None
        deadline = time.monotonic() + wait_timeout_s
        while self.in_flight() and time.monotonic() < deadline:
            if migrate:
                self._drain_step()
            time.sleep(0.05)
        return self.in_flight()

    def _drain_step(self) -> None:
        """Called while draining with `migrate`, every 50 ms until nothing is in flight."""

    def stop(self, grace_s: float = 1.0) -> None:
        if self.presence is not None:
            self.presence.stop(deregister=True)
            self.presence = None
        self.server.stop(grace_s).wait(grace_s + 1)
        self.loop.stop()
        if self._metrics_server is not None:
            self._metrics_server.stop()
            self._metrics_server = None
        self.kv.close()
        if self._owns_store:
            self.store.close()

    def wait(self) -> None:
        self.server.wait_for_termination()
