"""The router over real gRPC on 127.0.0.1, with no workers or with registered workers that
cannot be reached: validation, admission, discovery, health, reflection, draining."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from splitserve.cluster import open_store, prefix_index
from splitserve.cluster.store import ClusterStore, WorkerInfo, WorkerRole
from splitserve.router import latency
from splitserve.router.config import RouterConfig
from splitserve.router.server import RunningRouter, start_router
from splitserve.v1 import common_pb2, router_pb2, router_pb2_grpc

MODEL = "smollm2-135m"
TTL_S = 60.0


@pytest.fixture(scope="module")
def router() -> Iterator[RunningRouter]:
    with start_router(RouterConfig(worker_refresh_s=0.0)) as r:
        yield r


@pytest.fixture(scope="module")
def stub(router: RunningRouter) -> Iterator[router_pb2_grpc.SplitServeStub]:
    with grpc.insecure_channel(router.address) as channel:
        yield router_pb2_grpc.SplitServeStub(channel)


@pytest.fixture
def store(router: RunningRouter) -> Iterator[ClusterStore]:
    """The router's embedded cluster state, reached the way workers reach it."""
    remote = open_store(router.cluster_url)
    yield remote
    for info, _ in remote.live_workers():
        remote.deregister_worker(info.worker_id)
    remote.close()


def dead_address() -> str:
    """host:port where nothing listens (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def worker(worker_id: str, role: WorkerRole, block_size: int = 16, model: str = MODEL) -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, role=role, address=dead_address(), model=model,
                      block_size=block_size, num_total_blocks=100, kv_endpoint=f"kv://{worker_id}")


def generate(stub: router_pb2_grpc.SplitServeStub, timeout: float = 10.0,
             **fields: object) -> list[router_pb2.GenerateResponse]:
    return list(stub.Generate(router_pb2.GenerateRequest(**fields), timeout=timeout))  # type: ignore[arg-type]


def error_of(stub: router_pb2_grpc.SplitServeStub, **fields: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        generate(stub, **fields)
    return info.value.code(), info.value.details()  # type: ignore[attr-defined]


def test_addresses(router: RunningRouter) -> None:
    assert router.address == f"127.0.0.1:{router.port}" and router.port > 0
    assert router.cluster_url == f"grpc://127.0.0.1:{router.port}"


def test_list_models_without_workers(stub: router_pb2_grpc.SplitServeStub) -> None:
    response = stub.ListModels(router_pb2.ListModelsRequest(), timeout=5)
    assert list(response.models) == [router_pb2.ModelInfo(
        id=MODEL, max_model_len=8192, block_size=16, num_prefill_workers=0, num_decode_workers=0,
    )]


@pytest.mark.parametrize(("fields", "code", "details"), [
    ({}, grpc.StatusCode.INVALID_ARGUMENT, "no prompt: set one of prompt, messages or token_ids"),
    ({"prompt": ""}, grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
    ({"token_ids": router_pb2.TokenIds(token_ids=[1] * 8192)}, grpc.StatusCode.INVALID_ARGUMENT,
     "prompt has 8192 tokens but the model context holds 8192 (prompt plus at least one "
     "generated token)"),
    ({"token_ids": router_pb2.TokenIds(token_ids=[3, 49152])}, grpc.StatusCode.INVALID_ARGUMENT,
     "token_ids [49152] outside the vocabulary (size 49152)"),
    ({"prompt": "hi", "sampling_params": common_pb2.SamplingParams(temperature=-0.5)},
     grpc.StatusCode.INVALID_ARGUMENT,
     "invalid sampling_params: temperature must be in [0, 100], got -0.5"),
    ({"prompt": "hi", "sampling_params": common_pb2.SamplingParams(max_tokens=8192)},
     grpc.StatusCode.INVALID_ARGUMENT,
     "prompt (1 tokens) plus max_tokens (8192) exceeds the model context of 8192 tokens"),
    ({"prompt": "hi", "model": "llama-70b"}, grpc.StatusCode.NOT_FOUND,
     "model 'llama-70b' is not served here; available: ['smollm2-135m']"),
])
def test_bad_requests(stub: router_pb2_grpc.SplitServeStub, fields: dict[str, object],
                      code: grpc.StatusCode, details: str) -> None:
    assert error_of(stub, **fields) == (code, details)


def test_valid_request_without_decode_workers_is_unavailable(
        stub: router_pb2_grpc.SplitServeStub) -> None:
    assert error_of(stub, prompt="Hello") == (
        grpc.StatusCode.UNAVAILABLE,
        "no live decode worker serves model 'smollm2-135m'; start one and retry",
    )


def test_workers_registered_in_the_embedded_store_are_discovered(
        stub: router_pb2_grpc.SplitServeStub, store: ClusterStore) -> None:
    store.register_worker(worker("p0", WorkerRole.PREFILL), TTL_S)
    store.register_worker(worker("d0", WorkerRole.DECODE), TTL_S)
    store.register_worker(worker("b0", WorkerRole.BOTH), TTL_S)
    store.register_worker(worker("x0", WorkerRole.DECODE, block_size=32), TTL_S)
    store.register_worker(worker("y0", WorkerRole.DECODE, model="other"), TTL_S)
    model = stub.ListModels(router_pb2.ListModelsRequest(), timeout=5).models[0]
    # Colocated workers count in both pools; other block sizes and models not at all.
    assert (model.num_prefill_workers, model.num_decode_workers) == (2, 2)


def test_unreachable_decode_workers_make_the_request_unavailable(
        stub: router_pb2_grpc.SplitServeStub, store: ClusterStore) -> None:
    store.register_worker(worker("d0", WorkerRole.DECODE), TTL_S)
    store.register_worker(worker("d1", WorkerRole.DECODE), TTL_S)
    code, details = error_of(stub, prompt="Hello")
    assert code == grpc.StatusCode.UNAVAILABLE
    assert details.startswith("no decode worker admitted the request: d0: UNAVAILABLE: ")
    assert "; d1: UNAVAILABLE: " in details  # the next one was tried too


def test_workers_of_another_block_size_are_ignored(
        stub: router_pb2_grpc.SplitServeStub, store: ClusterStore) -> None:
    store.register_worker(worker("x0", WorkerRole.DECODE, block_size=32), TTL_S)
    assert error_of(stub, prompt="Hello") == (
        grpc.StatusCode.UNAVAILABLE,
        "no live decode worker serves model 'smollm2-135m' (1 live workers serve another "
        "model or block size); start one and retry",
    )


def test_a_second_router_shares_the_cluster_state(router: RunningRouter,
                                                  store: ClusterStore) -> None:
    store.register_worker(worker("d7", WorkerRole.DECODE), TTL_S)
    config = RouterConfig(cluster_url=router.cluster_url, worker_refresh_s=0.0)
    with start_router(config) as second, grpc.insecure_channel(second.address) as channel:
        assert second.cluster_url == router.cluster_url
        model = router_pb2_grpc.SplitServeStub(channel).ListModels(
            router_pb2.ListModelsRequest(), timeout=5).models[0]
        assert model.num_decode_workers == 1


def test_health_and_reflection(router: RunningRouter) -> None:
    with grpc.insecure_channel(router.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "splitserve.v1.SplitServe", "splitserve.v1.ClusterState"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(iter(reflection.ServerReflectionInfo(iter([request]), timeout=5)))
        names = {s.name for s in response.list_services_response.service}
        assert {"splitserve.v1.SplitServe", "splitserve.v1.ClusterState",
                "grpc.health.v1.Health"} <= names


def test_zero_capacity_is_resource_exhausted() -> None:
    with start_router(RouterConfig(max_inflight=0, max_queued=0)) as r, \
            grpc.insecure_channel(r.address) as channel:
        stub = router_pb2_grpc.SplitServeStub(channel)
        assert error_of(stub, prompt="Hello") == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "router over capacity: 0 requests in flight (max_inflight=0) and 0 queued "
            "(max_queued=0); retry later",
        )
        # Admission comes first: at overload nothing is spent on a request, not even
        # finding out that it is invalid.
        assert error_of(stub, prompt="")[0] == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_full_queue_rejects_and_a_queued_request_times_out() -> None:
    with start_router(RouterConfig(max_inflight=0, max_queued=1)) as r, \
            grpc.insecure_channel(r.address) as channel:
        stub = router_pb2_grpc.SplitServeStub(channel)
        queued = stub.Generate(router_pb2.GenerateRequest(prompt="Hello"), timeout=1.0)
        deadline = time.monotonic() + 3.0
        while r.num_queued == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (r.num_inflight, r.num_queued) == (0, 1)
        code, details = error_of(stub, prompt="Hello")
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "1 queued (max_queued=1)" in details
        with pytest.raises(grpc.RpcError) as info:
            list(queued)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        deadline = time.monotonic() + 3.0
        while r.num_queued and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (r.num_inflight, r.num_queued) == (0, 0)


def test_drain_refuses_new_requests_and_reports_not_serving() -> None:
    with start_router(RouterConfig()) as r, grpc.insecure_channel(r.address) as channel:
        assert r.drain(timeout_s=1.0) == 0
        stub = router_pb2_grpc.SplitServeStub(channel)
        assert error_of(stub, prompt="Hello") == (
            grpc.StatusCode.UNAVAILABLE, "router is draining; retry elsewhere")
        health = health_pb2_grpc.HealthStub(channel)

        def status(service: str) -> int:
            request = health_pb2.HealthCheckRequest(service=service)
            return health.Check(request, timeout=5).status

        deadline = time.monotonic() + 3.0
        while status("splitserve.v1.SplitServe") != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert status("") == health_pb2.HealthCheckResponse.NOT_SERVING
        # Workers keep heartbeating into the embedded store while the router drains.
        assert status("splitserve.v1.ClusterState") == health_pb2.HealthCheckResponse.SERVING


def test_serve_forever_returns_when_stopped_from_another_thread() -> None:
    r = start_router(RouterConfig())
    server_thread = threading.Thread(target=r.serve_forever)
    server_thread.start()
    time.sleep(0.05)
    assert server_thread.is_alive()
    r.stop(grace_s=0.5)
    server_thread.join(timeout=5)
    assert not server_thread.is_alive()
    r.stop()  # idempotent
    with grpc.insecure_channel(r.address) as channel, pytest.raises(grpc.RpcError) as info:
        router_pb2_grpc.SplitServeStub(channel).ListModels(router_pb2.ListModelsRequest(),
                                                          timeout=1)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


@pytest.mark.parametrize("policy, missing", [
    ("latency", ()), ("latency", ("scan",)), ("latency", ("lookup", "scan")),
    ("load", ("scan",)), ("load", ("lookup",))])
def test_a_router_without_its_compiled_parts_says_so(
        policy: str, missing: tuple[str, ...], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The latency table's scan and the prefix lookup in C are optional at build time; a
    router that routes without one it uses (slower, same routes) warns once at start, naming
    it, and only then."""
    if "scan" in missing:
        monkeypatch.setattr(latency, "_route_table", None)
    if "lookup" in missing:
        monkeypatch.setattr(prefix_index, "_prefix_runs", None)
    assert latency.has_compiled_scan() is ("scan" not in missing)
    assert prefix_index.has_compiled_lookup() is ("lookup" not in missing)
    with caplog.at_level("WARNING", logger="splitserve.router.server"), \
            start_router(RouterConfig(route_policy=policy)):
        pass
    warned = [r.getMessage() for r in caplog.records
              if "routing without the compiled" in r.getMessage()]
    named = [part for part in ("lookup", "scan")  # the scan: the latency policy's only
             if part in missing and (part == "lookup" or policy == "latency")]
    assert len(warned) == (1 if named else 0)
    for part, path in (("lookup", "_prefix_runs.c"), ("scan", "_route_table.c")):
        assert any(path in m for m in warned) is (part in named)
