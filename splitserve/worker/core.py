"""What a worker process keeps whatever role it plays (`WorkerCore`): the engine on its
loop thread (model weights, KV pool), the KV transfer backend, the cluster store, the gRPC
server and the metrics server; and the options they are built from (`WorkerOptions`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from splitserve.cluster import open_store
from splitserve.cluster.store import ClusterStore, WorkerRole
from splitserve.common import envs
from splitserve.common.auth import ApiKeys
from splitserve.common.grpc_guard import SyncGuardInterceptor
from splitserve.common.grpc_util import (
    HealthStatus,
    add_health_and_reflection,
    bind,
    service_name,
)
from splitserve.common.kv_layout import KVLayout
from splitserve.common.metrics import MetricsServer
from splitserve.engine.config import EngineConfig
from splitserve.engine.engine_loop import EngineLoop
from splitserve.engine.llm_engine import LLMEngine
from splitserve.kvtransfer.base import KVBackend
from splitserve.v1 import common_pb2, worker_pb2

log = logging.getLogger(__name__)
FailureHandler = Callable[[LLMEngine, BaseException], None]

ROLES = {"prefill": WorkerRole.PREFILL, "decode": WorkerRole.DECODE}
ROLE_PROTO = {"prefill": common_pb2.WORKER_ROLE_PREFILL, "decode": common_pb2.WORKER_ROLE_DECODE}
ROLE_SERVICES = {"prefill": service_name(worker_pb2, "PrefillWorker"),
                 "decode": service_name(worker_pb2, "DecodeWorker")}
CONTROL_SERVICE = service_name(worker_pb2, "WorkerControl")
WORKER_SERVICES = (*ROLE_SERVICES.values(), CONTROL_SERVICE)  # all need the cluster token
KV_SEND_MODES = ("auto", "layer", "whole")  # WorkerOptions.kv_send


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
    # A decode worker's Admit stream sends a request's tokens this many at a time (the
    # stream's first message, and its last, at once; a partial group after
    # STREAM_HOLD_S): fewer, larger messages for the router and the client to handle, at
    # the cost of burstier inter-token arrival (vLLM's --stream-interval). 1: every step.
    stream_interval: int = 1
    # A decode worker accepts routers' output channels (decode_worker.output_channel): a
    # request's outputs over one TCP connection per router, written by the engine thread,
    # instead of its Admit stream. Not under mutual TLS (plain TCP).
    output_channels: bool = True
    # How a prefill worker sends a prompt's KV: "layer" (each layer's blocks as soon as the
    # layer is computed, overlapping the transfer with the rest of the prompt's compute),
    # "whole" (every layer in one message once the last layer is computed), "auto"
    # ("layer" on a GPU; on CPU "layer" only for prompts whose per-layer messages reach
    # prefill_worker.worker.KV_LAYER_MESSAGE_MIN_BYTES: over gloo's TCP sockets each
    # message costs CPU that the prompt's compute and the decode worker need).
    kv_send: str = "auto"
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
        if not 1 <= self.stream_interval <= 64:
            raise ValueError(f"stream_interval must be in [1, 64], got {self.stream_interval}")
        if self.kv_send not in KV_SEND_MODES:
            raise ValueError(f"kv_send must be one of {KV_SEND_MODES}, got {self.kv_send!r}")
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
                    engine.runner.kv_layout_dtype, engine.config.resolved_dtype)


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


class WorkerCore:
    """What a worker process keeps whatever role it plays: the engine on its loop thread
    (model weights, KV pool), the KV backend, the cluster store, the gRPC server and the
    metrics server. A plain worker owns one; a flippable worker (worker.flip) keeps one
    while its role objects come and go."""

    def __init__(self, options: WorkerOptions, worker_id: str,
                 store: ClusterStore | None = None, thread_prefix: str = "worker") -> None:
        self.options = options
        self.worker_id = worker_id
        # The engine is built on the thread that steps it (EngineLoop.build says why).
        self.loop = EngineLoop.build(lambda: LLMEngine(options.engine))
        self.engine = self.loop.engine
        self.layout = engine_layout(self.engine)
        self.kv, self._kv_store_host = build_kv_backend(
            options, worker_id, self.layout, str(self.engine.runner.device)
        )
        token = options.resolved_cluster_token
        self.store = (store if store is not None
                      else open_store(options.cluster_url, token=token))
        self._owns_store = store is None
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=options.max_concurrent_rpcs,
                                       thread_name_prefix=f"{thread_prefix}-rpc"),
            options=[("grpc.so_reuseport", 0), *lease_options(options.lease_s)],
            # Calls need the cluster token (if set); undecodable ones get INVALID_ARGUMENT.
            interceptors=[SyncGuardInterceptor(
                [(ApiKeys.single("cluster", token, "the cluster token"), WORKER_SERVICES)])],
        )
        self.health: HealthStatus | None = None
        self.port = 0
        self.address = ""
        self.started_at = time.time()  # registrations keep it: a role switch is no restart
        self._metrics_server: MetricsServer | None = None
        # The engine failed (a step raised: loop.failure): the worker takes no more work.
        self.failed = threading.Event()
        self._failure_handlers: list[FailureHandler] = []  # the roles playing on this core
        self._failure_lock = threading.Lock()
        self._failure: BaseException | None = None  # as _engine_failed saw it
        self._handled: list[FailureHandler] = []  # handlers run (each runs once)
        self.loop.on_failure = self._engine_failed

    def on_engine_failure(self, handler: FailureHandler) -> None:
        """Call `handler(engine, exc)` once if a step fails (a role, while it plays: it
        hands back or fails its requests; on the loop thread, or here and now for a role
        that starts after the failure)."""
        with self._failure_lock:
            if handler not in self._failure_handlers:  # (a role started again: once)
                self._failure_handlers = [*self._failure_handlers, handler]
            failure = self._failure
            run_now = failure is not None and handler not in self._handled
            if run_now:
                self._handled.append(handler)
        if run_now:
            assert failure is not None
            handler(self.engine, failure)

    def remove_engine_failure_handler(self, handler: FailureHandler) -> None:
        with self._failure_lock:
            self._failure_handlers = [h for h in self._failure_handlers if h != handler]

    def _engine_failed(self, engine: LLMEngine, exc: BaseException) -> None:
        """The loop's on_failure: the roles end their requests, every service reports
        NOT_SERVING, and `failed` is set (a worker process then exits: `splitserve
        prefill|decode`)."""
        with self._failure_lock:
            self._failure = exc
            handlers = [h for h in self._failure_handlers if h not in self._handled]
            self._handled += handlers
        for handler in handlers:
            try:
                handler(engine, exc)
            except Exception:
                log.exception("worker %s: a role's engine-failure handler failed",
                              self.worker_id)
        self.failed.set()  # (first: a role switch marking health from now on sees it)
        if self.health is not None:
            self.health.set_not_serving()

    def bind(self, service_names: list[str]) -> None:
        """Health and reflection for `service_names`, then bind the server's port."""
        self.health = add_health_and_reflection(self.server, service_names)
        self.port = bind(self.server, f"{self.options.host}:{self.options.port}")
        self.address = f"{self.options.host}:{self.port}"

    @property
    def kv_endpoint(self) -> str:
        from splitserve.kvtransfer.torch_dist import TorchDistBackend

        if isinstance(self.kv, TorchDistBackend):
            return self.kv.endpoint
        return f"inproc://{self.worker_id}"

    @property
    def metrics_port(self) -> int | None:
        return None if self._metrics_server is None else self._metrics_server.port

    def serve_metrics(self, registry: CollectorRegistry, port: int = 0) -> int:
        """Serve `registry` over HTTP on options.host (the first call's); the bound port."""
        if self._metrics_server is None:
            self._metrics_server = MetricsServer(registry, self.options.host, port)
        return self._metrics_server.port

    def start(self) -> None:
        self.loop.start()
        self.server.start()

    def stop(self, grace_s: float = 1.0) -> None:
        self.server.stop(grace_s).wait(grace_s + 1)
        self.loop.stop()
        if self._metrics_server is not None:
            self._metrics_server.stop()
            self._metrics_server = None
        self.kv.close()
        if self._owns_store:
            self.store.close()
