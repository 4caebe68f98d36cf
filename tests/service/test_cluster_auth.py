"""The cluster token: only members of a deployment register, heartbeat, read cluster state or
receive requests. Issue 13's rogue worker (one that registered through the router's
cluster-state service and was then sent a user's prompt) is refused at registration. A real
router, prefill and decode worker in this process, with real gRPC and gloo."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.client import Client
from splitserve.cluster.memory import InMemoryClusterStore
from splitserve.cluster.remote import RemoteClusterStore, start_cluster_state_server
from splitserve.cluster.store import WorkerInfo, WorkerRole
from splitserve.common.grpc_guard import sync_channel
from splitserve.v1 import worker_pb2, worker_pb2_grpc
from tests.service.deployment import Deployment, start_deployment

TOKEN = "cluster-token-0123456789abcdef"
ENGINE = {"num_kv_blocks": 64, "block_size": 8, "max_num_batched_tokens": 128}


@pytest.fixture(scope="module")
def deployment(tiny_llama: Path) -> Iterator[Deployment]:
    d = start_deployment(str(tiny_llama), 1, 1, engine=ENGINE, cluster_token=TOKEN,
                         router={"local_prefill_threshold": 4})
    yield d
    d.stop()


def rogue_info() -> WorkerInfo:
    return WorkerInfo(worker_id="rogue", role=WorkerRole.DECODE, address="127.0.0.1:9",
                      model="x", block_size=8, num_total_blocks=1000)


def test_members_serve_requests_end_to_end(deployment: Deployment) -> None:
    with Client(deployment.address, timeout=60) as client:
        long_prompt = list(range(100, 140))  # remote prefill: router -> P -> D, all with it
        completion = client.generate(long_prompt, max_tokens=4, temperature=0.0,
                                     ignore_eos=True)
    assert len(completion.token_ids) == 4
    assert not completion.timings.prefill_local


@pytest.mark.parametrize("token", [None, "wrong-token-0123456789abcdef"])
def test_a_rogue_worker_cannot_register_or_read(deployment: Deployment,
                                                token: str | None) -> None:
    address = deployment.router.cluster_url.removeprefix("grpc://")
    rogue = RemoteClusterStore(address, token=token)
    try:
        with pytest.raises(grpc.RpcError) as info:
            rogue.register_worker(rogue_info(), ttl_s=30)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            rogue.live_workers()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        rogue.close()
    ids = {info.worker_id for info, _ in deployment.router.store.live_workers()}
    assert "rogue" not in ids and len(ids) == 2


@pytest.mark.parametrize("index", [0, 1])
def test_worker_rpcs_need_the_token_and_health_stays_open(deployment: Deployment,
                                                          index: int) -> None:
    worker = (deployment.prefill + deployment.decode)[index]
    calls = [(worker_pb2_grpc.PrefillWorkerStub, worker_pb2.PrefillStatsRequest()),
             (worker_pb2_grpc.DecodeWorkerStub, worker_pb2.DecodeStatsRequest())]
    stub_class, request = calls[index]
    for token in (None, "wrong-token-0123456789abcdef"):
        with sync_channel(worker.address, token) as channel, \
                pytest.raises(grpc.RpcError) as info:
            stub_class(channel).Stats(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with sync_channel(worker.address, TOKEN) as channel:
        stub_class(channel).Stats(request, timeout=10)
    with grpc.insecure_channel(worker.address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                           timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING


def test_the_standalone_cluster_state_server_checks_the_token() -> None:
    server, port = start_cluster_state_server(InMemoryClusterStore(), token=TOKEN)
    try:
        member = RemoteClusterStore(f"127.0.0.1:{port}", token=TOKEN)
        member.register_worker(rogue_info(), ttl_s=30)
        assert [info.worker_id for info, _ in member.live_workers()] == ["rogue"]
        member.close()
        outsider = RemoteClusterStore(f"127.0.0.1:{port}")
        with pytest.raises(grpc.RpcError) as info:
            outsider.live_workers()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        outsider.close()
    finally:
        server.stop(0)


def test_garbage_without_the_token_is_refused_before_decoding(deployment: Deployment) -> None:
    with grpc.insecure_channel(deployment.decode[0].address) as channel:
        raw = channel.unary_unary("/splitserve.v1.DecodeWorker/Stats",
                                  request_serializer=lambda b: b,
                                  response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as info:
            raw(b"\xff\xff\xff\xff", timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
