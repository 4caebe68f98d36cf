"""ClusterStore over gRPC: a servicer hosting any store, and a store that calls it.

On one machine without Redis, the router hosts an InMemoryClusterStore through
`ClusterStateServicer` and workers open "grpc://host:port" (a `RemoteClusterStore`).
The servicer is thin: protobuf <-> dataclasses (cluster.convert) and ValueError <->
INVALID_ARGUMENT, mapped in one place on each side.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from concurrent import futures
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from splitserve.cluster.store import (
    ClusterStore,
    LiveWorker,
    PrefixOverlap,
    RequestLedgerEntry,
    WorkerInfo,
    WorkerLoadReport,
    WorkerRole,
    check_block_hashes,
    check_service_deltas,
    check_tier,
    ttl_to_ms,
)
from splitserve.common import envs
from splitserve.common.auth import ApiKeys
from splitserve.common.convert import cluster as convert
from splitserve.common.convert import common as common_convert
from splitserve.common.grpc_guard import SyncGuardInterceptor, sync_channel
from splitserve.common.grpc_util import bind
from splitserve.v1 import cluster_pb2 as pb
from splitserve.v1 import cluster_pb2_grpc

_TIER_TO_PROTO = {"device": pb.KV_TIER_DEVICE, "host": pb.KV_TIER_HOST, "disk": pb.KV_TIER_DISK}
_TIER_FROM_PROTO = {v: k for k, v in _TIER_TO_PROTO.items()}

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ClusterState"].full_name
_Handler = TypeVar("_Handler", bound=Callable[..., Any])


def _invalid_argument_on_value_error(method: _Handler) -> _Handler:
    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    return wrapper  # type: ignore[return-value]


class ClusterStateServicer(cluster_pb2_grpc.ClusterStateServicer):
    """Serves `store` as splitserve.v1.ClusterState. Does not own (close) the store."""

    def __init__(self, store: ClusterStore) -> None:
        self._store = store

    @_invalid_argument_on_value_error
    def RegisterWorker(self, request: Any, context: Any) -> pb.RegisterWorkerResponse:
        self._store.register_worker(convert.info_from_proto(request.info), request.ttl_ms / 1000)
        return pb.RegisterWorkerResponse()

    @_invalid_argument_on_value_error
    def Heartbeat(self, request: Any, context: Any) -> pb.HeartbeatResponse:
        load = convert.load_from_proto(request.load) if request.HasField("load") else None
        live = self._store.heartbeat(request.worker_id, load, request.ttl_ms / 1000)
        return pb.HeartbeatResponse(live=live)

    @_invalid_argument_on_value_error
    def DeregisterWorker(self, request: Any, context: Any) -> pb.DeregisterWorkerResponse:
        self._store.deregister_worker(request.worker_id)
        return pb.DeregisterWorkerResponse()

    @_invalid_argument_on_value_error
    def LiveWorkers(self, request: Any, context: Any) -> pb.LiveWorkersResponse:
        workers = self._store.live_workers(common_convert.role_from_proto(request.role))
        response = pb.LiveWorkersResponse()
        for info, load in workers:
            item = response.workers.add(info=convert.info_to_proto(info))
            if load is not None:
                item.load.CopyFrom(convert.load_to_proto(load))
        return response

    @_invalid_argument_on_value_error
    def PublishPrefixEvents(self, request: Any, context: Any) -> pb.PublishPrefixEventsResponse:
        # UNSPECIFIED (a worker from before the tiers) is the device; an unknown value (a
        # newer worker's tier) is refused rather than filed as device blocks.
        tier = "device" if request.tier == pb.KV_TIER_UNSPECIFIED \
            else _TIER_FROM_PROTO.get(request.tier)
        if tier is None:
            raise ValueError(f"unknown KV tier {request.tier}")
        self._store.publish_prefix_events(
            request.worker_id, list(request.stored_hashes), list(request.evicted_hashes),
            tier=tier,
        )
        return pb.PublishPrefixEventsResponse()

    @_invalid_argument_on_value_error
    def PrefixOverlap(self, request: Any, context: Any) -> pb.PrefixOverlapResponse:
        hashes = list(request.block_hashes)
        if not request.with_tiers:
            return pb.PrefixOverlapResponse(
                num_cached_blocks=self._store.prefix_overlap(hashes))
        response = pb.PrefixOverlapResponse()  # tier runs only: one lookup, not two
        for wid, run in self._store.prefix_overlap_tiers(hashes).items():
            response.tier_runs[wid].CopyFrom(pb.PrefixTierRun(
                device_blocks=run.device_blocks, host_blocks=run.host_blocks,
                disk_blocks=run.disk_blocks))
        return response

    @_invalid_argument_on_value_error
    def LedgerPut(self, request: Any, context: Any) -> pb.LedgerPutResponse:
        self._store.ledger_put(convert.entry_from_proto(request.entry))
        return pb.LedgerPutResponse()

    @_invalid_argument_on_value_error
    def LedgerGet(self, request: Any, context: Any) -> pb.LedgerGetResponse:
        entry = self._store.ledger_get(request.request_id)
        if entry is None:
            return pb.LedgerGetResponse(found=False)
        return pb.LedgerGetResponse(found=True, entry=convert.entry_to_proto(entry))

    @_invalid_argument_on_value_error
    def LedgerDelete(self, request: Any, context: Any) -> pb.LedgerDeleteResponse:
        return pb.LedgerDeleteResponse(found=self._store.ledger_delete(request.request_id))

    @_invalid_argument_on_value_error
    def AddService(self, request: Any, context: Any) -> pb.AddServiceResponse:
        return pb.AddServiceResponse(totals=self._store.add_service(dict(request.deltas)))

    @_invalid_argument_on_value_error
    def LedgerByWorker(self, request: Any, context: Any) -> pb.LedgerByWorkerResponse:
        entries = self._store.ledger_by_worker(request.worker_id)
        return pb.LedgerByWorkerResponse(entries=[convert.entry_to_proto(e) for e in entries])


def add_cluster_state(server: grpc.Server, store: ClusterStore) -> None:
    """Register the ClusterState servicer for `store` on an existing (not started) server."""
    cluster_pb2_grpc.add_ClusterStateServicer_to_server(ClusterStateServicer(store), server)


def start_cluster_state_server(
    store: ClusterStore, address: str = "127.0.0.1:0", max_workers: int = 8,
    token: str | None = None,
) -> tuple[grpc.Server, int]:
    """A started gRPC server hosting `store`, plus health and reflection.

    `address` port 0 picks a free port; returns (server, bound port). Stop it with
    `server.stop(grace)`; the store stays open. With `token` (None: SPLITSERVE_CLUSTER_TOKEN),
    every ClusterState call must carry it (`authorization: Bearer <token>`).
    """
    token = envs.cluster_token(token)
    guard = SyncGuardInterceptor(
        [(ApiKeys.single("cluster", token, "the cluster token"), [SERVICE_NAME])])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         interceptors=[guard])
    add_cluster_state(server, store)
    health_servicer = health.HealthServicer()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = bind(server, address)
    server.start()
    return server, port


class RemoteClusterStore(ClusterStore):
    """A ClusterStore served by a ClusterState server at `address` ("host:port").

    Every call has a deadline of `timeout_s`; an INVALID_ARGUMENT reply raises ValueError,
    other failures raise grpc.RpcError.
    """

    def __init__(self, address: str, timeout_s: float = 5.0, token: str | None = None) -> None:
        self._channel = sync_channel(address, token)
        self._stub = cluster_pb2_grpc.ClusterStateStub(self._channel)
        self._timeout_s = timeout_s

    def _call(self, rpc: Callable[..., Any], request: Any) -> Any:
        try:
            return rpc(request, timeout=self._timeout_s)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise ValueError(exc.details()) from exc
            raise

    def register_worker(self, info: WorkerInfo, ttl_s: float) -> None:
        request = pb.RegisterWorkerRequest(info=convert.info_to_proto(info), ttl_ms=ttl_to_ms(ttl_s))
        self._call(self._stub.RegisterWorker, request)

    def heartbeat(self, worker_id: str, load: WorkerLoadReport | None, ttl_s: float) -> bool:
        request = pb.HeartbeatRequest(worker_id=worker_id, ttl_ms=ttl_to_ms(ttl_s))
        if load is not None:
            request.load.CopyFrom(convert.load_to_proto(load))
        return bool(self._call(self._stub.Heartbeat, request).live)

    def deregister_worker(self, worker_id: str) -> None:
        self._call(self._stub.DeregisterWorker, pb.DeregisterWorkerRequest(worker_id=worker_id))

    def live_workers(self, role: WorkerRole | None = None) -> list[LiveWorker]:
        request = pb.LiveWorkersRequest(role=common_convert.role_to_proto(role))
        response = self._call(self._stub.LiveWorkers, request)
        return [
            (
                convert.info_from_proto(w.info),
                convert.load_from_proto(w.load) if w.HasField("load") else None,
            )
            for w in response.workers
        ]

    def publish_prefix_events(
        self, worker_id: str, stored_hashes: list[int], evicted_hashes: list[int],
        tier: str = "device",
    ) -> None:
        check_tier(tier)
        check_block_hashes(stored_hashes)
        check_block_hashes(evicted_hashes)
        request = pb.PublishPrefixEventsRequest(
            worker_id=worker_id, stored_hashes=stored_hashes, evicted_hashes=evicted_hashes,
            tier=_TIER_TO_PROTO[tier],
        )
        self._call(self._stub.PublishPrefixEvents, request)

    def prefix_overlap(self, block_hashes: list[int]) -> dict[str, int]:
        check_block_hashes(block_hashes)
        request = pb.PrefixOverlapRequest(block_hashes=block_hashes)
        response = self._call(self._stub.PrefixOverlap, request)
        return dict(sorted(response.num_cached_blocks.items()))

    def prefix_overlap_tiers(self, block_hashes: list[int], among: AbstractSet[str] | None = None
                             ) -> dict[str, PrefixOverlap]:
        check_block_hashes(block_hashes)
        request = pb.PrefixOverlapRequest(block_hashes=block_hashes, with_tiers=True)
        response = self._call(self._stub.PrefixOverlap, request)
        if not response.tier_runs and response.num_cached_blocks:
            # A cluster-state server from before the tiers: its runs are device blocks.
            return {wid: PrefixOverlap(n, 0, 0)
                    for wid, n in sorted(response.num_cached_blocks.items())
                    if among is None or wid in among}
        return {wid: PrefixOverlap(run.device_blocks, run.host_blocks, run.disk_blocks)
                for wid, run in sorted(response.tier_runs.items())
                if among is None or wid in among}

    def ledger_put(self, entry: RequestLedgerEntry) -> None:
        self._call(self._stub.LedgerPut, pb.LedgerPutRequest(entry=convert.entry_to_proto(entry)))

    def ledger_get(self, request_id: str) -> RequestLedgerEntry | None:
        response = self._call(self._stub.LedgerGet, pb.LedgerGetRequest(request_id=request_id))
        return convert.entry_from_proto(response.entry) if response.found else None

    def ledger_delete(self, request_id: str) -> bool:
        request = pb.LedgerDeleteRequest(request_id=request_id)
        return bool(self._call(self._stub.LedgerDelete, request).found)

    def ledger_by_worker(self, worker_id: str) -> list[RequestLedgerEntry]:
        request = pb.LedgerByWorkerRequest(worker_id=worker_id)
        response = self._call(self._stub.LedgerByWorker, request)
        return [convert.entry_from_proto(e) for e in response.entries]

    def add_service(self, deltas: Mapping[str, float]) -> dict[str, float]:
        check_service_deltas(deltas)
        response = self._call(self._stub.AddService, pb.AddServiceRequest(deltas=dict(deltas)))
        return dict(response.totals)

    def close(self) -> None:
        self._channel.close()
