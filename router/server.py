"""Starting and stopping a router.

`RouterServer` is the router on an asyncio loop the caller runs. `start_router` runs one
on a loop in its own thread and returns a `RunningRouter`, the synchronous handle the CLI
and the Ray actor use (SIGTERM handling belongs to the CLI: it calls drain() then stop()).

With `RouterConfig.cluster_url` None the router hosts the cluster store in memory and
serves it as splitserve.v1.ClusterState on its own port: workers open
`RunningRouter.cluster_url` ("grpc://host:port").

With `RouterConfig.http_port` not None the router also serves the OpenAI-compatible HTTP
API and GET /metrics on the same loop (router.http_api), sharing the gRPC path's
RequestPipeline, admission and metrics.

With `RouterConfig.pd_control` the router also runs the P:D controller on its loop
(router.pd_control): it moves workers started --flippable between the two roles.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from concurrent import futures
from typing import Any, TypeVar

import grpc

from splitserve.cluster import InMemoryClusterStore, open_store, prefix_index
from splitserve.cluster.remote import add_cluster_state
from splitserve.cluster.store import ClusterStore
from splitserve.common import envs
from splitserve.common.auth import ApiKeys
from splitserve.common.grpc_guard import GuardInterceptor
from splitserve.common.grpc_util import (
    DEFAULT_SERVER_OPTIONS,
    HealthStatus,
    add_health_and_reflection,
    bind,
    create_aio_server,
    service_name,
)
from splitserve.router import latency
from splitserve.router.admission import AdmissionController
from splitserve.router.cluster_io import AsyncStore
from splitserve.router.config import RouterConfig
from splitserve.router.fairness import FairShare
from splitserve.router.http_api import HttpApi
from splitserve.router.metrics import RouterMetrics
from splitserve.router.model import ServedModel, load_served_model
from splitserve.router.pd_control import PDController
from splitserve.router.service import RequestPipeline, SplitServeServicer
from splitserve.router.state import RouterState
from splitserve.v1 import cluster_pb2, router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")

SPLITSERVE_SERVICE = service_name(router_pb2, "SplitServe")
_GRPC_DEFAULT_MAX_RECEIVE_BYTES = 4 * 1024 * 1024
CLUSTER_STATE_SERVICE = service_name(cluster_pb2, "ClusterState")
_WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


def advertised_host(host: str) -> str:
    """The host clients on this machine dial when the server binds `host`."""
    return "127.0.0.1" if host in _WILDCARD_HOSTS else host


def missing_compiled_parts(config: RouterConfig) -> list[str]:
    """The optional C parts (setup.py) this router's decisions would use that this install
    lacks: the prefix index's device lookup (every decision reads prompt overlaps), the
    latency table's scan (route_policy latency)."""
    missing = []
    if not prefix_index.has_compiled_lookup():
        missing.append("prefix lookup (splitserve/cluster/_prefix_runs.c)")
    if config.route_policy == "latency" and not latency.has_compiled_scan():
        missing.append("latency table scan (router/_route_table.c)")
    return missing


class RouterServer:
    """A router on the running asyncio loop: `await start()`, then `await stop()`."""

    def __init__(self, config: RouterConfig, store: ClusterStore | None = None) -> None:
        self.config = config
        self._given_store = store
        self.store: ClusterStore | None = None
        self.model: ServedModel | None = None
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._pool: futures.ThreadPoolExecutor | None = None
        self._state: RouterState | None = None
        self._health: HealthStatus | None = None
        self.admission = AdmissionController(config.max_inflight, config.max_queued,
                                             FairShare(config.fair_share))
        self.metrics = RouterMetrics(self.admission)
        self._http: HttpApi | None = None
        self._fair_sync: asyncio.Task[None] | None = None
        self.pd_controller: PDController | None = None  # with config.pd_control
        self._pd_task: asyncio.Task[None] | None = None
        self.http_port: int | None = None  # bound HTTP port; None while not serving HTTP

    @property
    def address(self) -> str:
        return f"{advertised_host(self.config.host)}:{self.port}"

    @property
    def http_address(self) -> str | None:
        """host:port of the HTTP API (None when RouterConfig.http_port is None)."""
        if self.http_port is None:
            return None
        return f"{advertised_host(self.config.host)}:{self.http_port}"

    @property
    def cluster_url(self) -> str:
        """What workers pass to cluster.open_store to reach this router's cluster state."""
        if self.config.cluster_url is not None:
            return self.config.cluster_url
        return f"grpc://{self.address}"

    async def start(self) -> None:
        config = self.config
        self.model = await asyncio.to_thread(load_served_model, config.model, config.max_model_len,
                                               config.chat_template)
        if self._given_store is not None:
            self.store = self._given_store
        elif config.embedded_cluster:
            self.store = InMemoryClusterStore()
        else:
            self.store = open_store(config.cluster_url, token=config.resolved_cluster_token)
        self._state = RouterState.build(config, self.model, AsyncStore(self.store))
        self._pool = futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="router-sync")
        api_keys = ApiKeys.load(config.api_keys_file, envs.get("SPLITSERVE_API_KEYS"))
        cluster_keys = ApiKeys.single("cluster", config.resolved_cluster_token,
                                      "the cluster token")
        # max_request_bytes bounds client requests; the cluster-state service (prefix
        # events from workers) keeps gRPC's own limit or more.
        guard = GuardInterceptor([(api_keys, [SPLITSERVE_SERVICE]),
                                  (cluster_keys, [CLUSTER_STATE_SERVICE])],
                                 size_limits={SPLITSERVE_SERVICE: config.max_request_bytes})
        receive_limit = max(config.max_request_bytes, _GRPC_DEFAULT_MAX_RECEIVE_BYTES)
        server = create_aio_server(
            options=(*DEFAULT_SERVER_OPTIONS,
                     ("grpc.max_receive_message_length", receive_limit)),
            sync_handler_pool=self._pool, interceptors=[guard])
        log.info("router API keys: %s; cluster token: %s",
                 f"{len(api_keys)} configured" if api_keys else "none (open API)",
                 "set" if cluster_keys else "none")
        pipeline = RequestPipeline(self._state, self.admission, self.metrics)
        router_pb2_grpc.add_SplitServeServicer_to_server(SplitServeServicer(pipeline, api_keys),
                                                        server)
        services = [SPLITSERVE_SERVICE]
        if config.embedded_cluster:
            add_cluster_state(server, self.store)  # type: ignore[arg-type]
            services.append(CLUSTER_STATE_SERVICE)
        self._health = add_health_and_reflection(server, services)
        self.port = bind(server, config.bind_address)
        await server.start()
        self._server = server
        self._fair_sync = asyncio.get_running_loop().create_task(self._sync_fair_share())
        if config.pd_control is not None:
            self.pd_controller = PDController(config.pd_control, self._state, self.metrics,
                                              self.admission)
            self._pd_task = asyncio.get_running_loop().create_task(self.pd_controller.run())
        if config.http_port is not None:
            self._http = HttpApi(pipeline, self.metrics, config.max_request_bytes, api_keys,
                                 public_metrics=config.public_metrics)
            self.http_port = await self._http.start(config.host, config.http_port)
        log.info("router serving model %s on %s, HTTP on %s (cluster state: %s)",
                 self.model.model_id, self.address, self.http_address, self.cluster_url)
        missing = missing_compiled_parts(config)
        if missing:
            log.warning("routing without the compiled %s: not built in this install; their "
                        "Python paths give the same routes, more slowly (BENCHMARKS.md)",
                        " and ".join(missing))

    async def drain(self, timeout_s: float = 30.0) -> int:
        """Stop admitting requests (UNAVAILABLE, health NOT_SERVING) and wait up to
        `timeout_s` for those in flight or queued. Returns how many are left (0: drained).
        The embedded cluster state keeps serving: workers still heartbeat into it."""
        self.admission.close()
        if self._health is not None:
            self._health.set_not_serving(["", SPLITSERVE_SERVICE])
        return await self.admission.wait_idle(timeout_s)

    async def _sync_fair_share(self) -> None:
        """Share fair-share counters with the deployment's other routers (router.fairness)."""
        assert self._state is not None
        store, fair = self._state.store, self.admission.fair
        while True:
            await asyncio.sleep(self.config.fair_share_sync_s)
            pending = fair.take_pending()
            try:
                fair.merge(await store.add_service(pending))
            except Exception:  # noqa: BLE001 - the store is down: keep counting locally
                log.warning("fair-share counters not shared (cluster state unreachable)",
                            exc_info=log.isEnabledFor(logging.DEBUG))
                fair.merge({}, unsent=pending)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop serving: calls still running after `grace_s` are cancelled (their requests
        are aborted on the workers), then channels and an owned store are closed."""
        self.admission.close()
        for task in (self._fair_sync, self._pd_task):
            if task is not None:
                task.cancel()
        self._fair_sync = self._pd_task = None
        if self._http is not None:
            await self._http.stop()
            self._http = None
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
        if self._state is not None:
            await self._state.wait_background(timeout_s=5.0)
            self._state.output_channels.close()
            await self._state.directory.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self.store is not None and self._given_store is None:
            self.store.close()

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


class RunningRouter:
    """A router whose asyncio loop runs in a background thread (see start_router)."""

    def __init__(self, config: RouterConfig, store: ClusterStore | None = None) -> None:
        self.config = config
        self._router = RouterServer(config, store)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="router-loop",
                                        daemon=True)
        self._stopped = threading.Event()

    def _start(self, timeout_s: float = 900.0) -> None:
        self._thread.start()
        try:
            self._call(self._router.start(), timeout_s)
        except BaseException:
            self._call(self._router.stop(0), 30.0)
            self._shutdown_loop()
            raise

    def _call(self, coro: Coroutine[Any, Any, T], timeout_s: float | None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    @property
    def address(self) -> str:
        """host:port clients dial ("127.0.0.1:PORT" for a wildcard or loopback bind)."""
        return self._router.address

    @property
    def port(self) -> int:
        return self._router.port

    @property
    def http_port(self) -> int | None:
        """The bound HTTP port; None when RouterConfig.http_port is None."""
        return self._router.http_port

    @property
    def http_address(self) -> str | None:
        """host:port of the OpenAI-compatible API: base_url f"http://{http_address}/v1"."""
        return self._router.http_address

    @property
    def metrics(self) -> RouterMetrics:
        return self._router.metrics

    @property
    def cluster_url(self) -> str:
        return self._router.cluster_url

    @property
    def pd_controller(self) -> PDController | None:
        """The P:D controller (RouterConfig.pd_control), None when off."""
        return self._router.pd_controller

    @property
    def store(self) -> ClusterStore:
        assert self._router.store is not None
        return self._router.store

    @property
    def model(self) -> ServedModel:
        assert self._router.model is not None
        return self._router.model

    @property
    def num_inflight(self) -> int:
        """Requests holding an admission slot now."""
        return self._router.admission.num_inflight

    @property
    def num_queued(self) -> int:
        """Requests waiting for an admission slot now."""
        return self._router.admission.num_queued

    def drain(self, timeout_s: float = 30.0) -> int:
        """RouterServer.drain from synchronous code; returns requests left."""
        return int(self._call(self._router.drain(timeout_s), timeout_s + 10.0))

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop the router and its loop thread. Idempotent; any thread but the loop's."""
        if self._stopped.is_set():
            return
        try:
            self._call(self._router.stop(grace_s), grace_s + 30.0)
        finally:
            self._shutdown_loop()
            self._stopped.set()

    def _shutdown_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10.0)
        if not self._thread.is_alive():
            self._loop.close()

    def serve_forever(self) -> None:
        """Block the calling thread until stop() is called (e.g. by a signal handler)."""
        while not self._stopped.wait(timeout=1.0):
            pass

    def __enter__(self) -> RunningRouter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_router(
    config: RouterConfig | None = None, store: ClusterStore | None = None
) -> RunningRouter:
    """Start a router on its own loop thread; returns once it is serving.

    `store`: use this cluster store instead of the one `config.cluster_url` names (it is
    served as ClusterState when `config.cluster_url` is None; the caller closes it).
    """
    router = RunningRouter(config or RouterConfig(), store)
    router._start()
    return router
