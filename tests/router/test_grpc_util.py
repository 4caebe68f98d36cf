"""splitserve.common.grpc_util: error mapping, health and reflection on a sync server."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.common.grpc_util import (
    HealthStatus,
    ServiceError,
    add_health_and_reflection,
    bind,
    create_server,
    map_errors,
    service_name,
    status_of,
)
from splitserve.v1 import cluster_pb2, cluster_pb2_grpc, router_pb2


@pytest.mark.parametrize(("exc", "expected"), [
    (ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, "full"),
     (grpc.StatusCode.RESOURCE_EXHAUSTED, "full")),
    (ValueError("bad id"), (grpc.StatusCode.INVALID_ARGUMENT, "bad id")),
    (TimeoutError(), (grpc.StatusCode.DEADLINE_EXCEEDED, "timed out")),
    (NotImplementedError(), (grpc.StatusCode.UNIMPLEMENTED, "not implemented")),
    (KeyError("x"), (grpc.StatusCode.INTERNAL, "internal error: KeyError: 'x'")),
])
def test_status_of(exc: BaseException, expected: tuple[grpc.StatusCode, str]) -> None:
    assert status_of(exc) == expected


def test_service_name() -> None:
    assert service_name(router_pb2, "SplitServe") == "splitserve.v1.SplitServe"


class _Failing(cluster_pb2_grpc.ClusterStateServicer):
    """Every RPC raises what its worker_id names (a stand-in for a handler's errors)."""

    @map_errors
    def DeregisterWorker(self, request, context):  # type: ignore[no-untyped-def]
        if request.worker_id == "value":
            raise ValueError("no such worker")
        if request.worker_id == "service":
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "draining")
        if request.worker_id == "bug":
            raise ZeroDivisionError("division by zero")
        return cluster_pb2.DeregisterWorkerResponse()


@pytest.fixture
def served() -> Iterator[tuple[grpc.Channel, HealthStatus, int]]:
    server = create_server(max_workers=2)
    cluster_pb2_grpc.add_ClusterStateServicer_to_server(_Failing(), server)
    health = add_health_and_reflection(server, [service_name(cluster_pb2, "ClusterState")])
    port = bind(server, "127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel, health, port
    server.stop(0)


def test_map_errors_sets_codes_and_messages(served: tuple[grpc.Channel, HealthStatus, int]) -> None:
    stub = cluster_pb2_grpc.ClusterStateStub(served[0])
    for worker_id, code, details in [
        ("value", grpc.StatusCode.INVALID_ARGUMENT, "no such worker"),
        ("service", grpc.StatusCode.FAILED_PRECONDITION, "draining"),
        ("bug", grpc.StatusCode.INTERNAL, "internal error: ZeroDivisionError: division by zero"),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            stub.DeregisterWorker(cluster_pb2.DeregisterWorkerRequest(worker_id=worker_id),
                                  timeout=5)
        assert (info.value.code(), info.value.details()) == (code, details)  # type: ignore[attr-defined]
    stub.DeregisterWorker(cluster_pb2.DeregisterWorkerRequest(worker_id="fine"), timeout=5)


def test_invalid_argument_is_logged_with_where_it_was_raised(
        served: tuple[grpc.Channel, HealthStatus, int], caplog: pytest.LogCaptureFixture) -> None:
    """A ValueError becomes INVALID_ARGUMENT; at INFO the log names the line that raised it,
    so an internal bug that raises one can be told from a validation."""
    stub = cluster_pb2_grpc.ClusterStateStub(served[0])
    with caplog.at_level("INFO", logger="splitserve.common.grpc_util"):
        with pytest.raises(grpc.RpcError):
            stub.DeregisterWorker(cluster_pb2.DeregisterWorkerRequest(worker_id="value"),
                                  timeout=5)
    lines = [r.getMessage() for r in caplog.records if "INVALID_ARGUMENT" in r.getMessage()]
    assert len(lines) == 1, caplog.text
    assert "DeregisterWorker" in lines[0] and "no such worker" in lines[0]
    assert __file__.rsplit("/", 1)[-1] in lines[0]  # raised in _Failing, in this file
    assert all(r.levelname == "INFO" for r in caplog.records if "INVALID_ARGUMENT" in r.getMessage())


def test_health_flips_to_not_serving(served: tuple[grpc.Channel, HealthStatus, int]) -> None:
    channel, health, _ = served
    stub = health_pb2_grpc.HealthStub(channel)

    def status(service: str) -> int:
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    names = ("", "splitserve.v1.ClusterState")
    assert [status(n) for n in names] == [health_pb2.HealthCheckResponse.SERVING] * 2
    health.set_not_serving()
    assert not health.serving
    assert [status(n) for n in names] == [health_pb2.HealthCheckResponse.NOT_SERVING] * 2
    health.set_serving(["splitserve.v1.ClusterState"])
    assert status("splitserve.v1.ClusterState") == health_pb2.HealthCheckResponse.SERVING


def test_bind_fails_loudly_on_a_taken_port(served: tuple[grpc.Channel, HealthStatus, int]) -> None:
    other = create_server(max_workers=1)
    with pytest.raises(OSError, match="cannot bind"):
        bind(other, f"127.0.0.1:{served[2]}")
    other.stop(0)
