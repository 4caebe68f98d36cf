"""Role flipping (worker.flip) over real gRPC: a worker serves as prefill, switches to
decode and serves there, and back, on the same weights and KV pool with the same greedy
tokens; a second switch while one is in progress, a switch of the last worker of a role
and a call without the cluster token are refused."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from splitserve.cluster.memory import InMemoryClusterStore
from splitserve.cluster.store import WorkerRole
from splitserve.common.convert.common import sampling_to_proto
from splitserve.common.sampling_params import SamplingParams
from splitserve.decode_worker.worker import DecodeWorker
from splitserve.engine.config import EngineConfig
from splitserve.llm import LLM
from splitserve.prefill_worker.worker import PrefillWorker
from splitserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from splitserve.worker.flip import FlippableWorker
from splitserve.worker.runtime import WorkerOptions

ROLES: dict[str, Any] = {"prefill": PrefillWorker, "decode": DecodeWorker}
PROMPT = list(range(300, 341))
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
DECODE, PREFILL = common_pb2.WORKER_ROLE_DECODE, common_pb2.WORKER_ROLE_PREFILL
Cluster = tuple[InMemoryClusterStore, FlippableWorker, PrefillWorker, DecodeWorker]


def _engine(model: Path) -> EngineConfig:
    return EngineConfig(model=str(model), num_kv_blocks=64, block_size=8,
                        max_num_batched_tokens=32)


@pytest.fixture
def cluster(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """A flippable worker starting as prefill, beside a plain prefill and decode worker."""
    monkeypatch.setattr(PrefillWorker, "switch_grace_s", 0.1)  # no stale routers here
    store = InMemoryClusterStore()

    def options(worker_id: str) -> WorkerOptions:
        return WorkerOptions(engine=_engine(tiny_llama), kv_backend="inproc",
                             worker_id=worker_id)

    flip = FlippableWorker(options("f"), ROLES, "prefill", store).start()
    p0 = PrefillWorker(options("p0"), store).start()
    d0 = DecodeWorker(options("d0"), store).start()
    yield store, flip, p0, d0
    for worker in (flip, p0, d0):
        worker.stop(0.2)


def _generate(p_address: str, p_id: str, d_address: str, rid: str) -> list[int]:
    dstub = worker_pb2_grpc.DecodeWorkerStub(grpc.insecure_channel(d_address))
    pstub = worker_pb2_grpc.PrefillWorkerStub(grpc.insecure_channel(p_address))
    params = sampling_to_proto(GREEDY)
    stream = dstub.Admit(worker_pb2.AdmitRequest(
        request_id=rid, prompt_token_ids=PROMPT, sampling_params=params,
        prefill_worker_id=p_id, prefill_timeout_ms=20000))
    admission = next(stream).admission
    assert admission.accepted, admission.refusal_message
    first = pstub.Prefill(worker_pb2.PrefillRequest(
        request_id=rid, prompt_token_ids=PROMPT, sampling_params=params,
        decode_worker_id=admission.decode_worker_id, decode_block_ids=admission.block_ids,
        kv_layout=admission.kv_layout), timeout=30)
    dstub.PrefillDone(worker_pb2.PrefillDoneRequest(request_id=rid,
                                                    first_token_id=first.first_token_id))
    return [first.first_token_id, *(t for m in stream for t in m.output.token_ids)]


def _switch(address: str, target: int, **fields: Any) -> worker_pb2.SwitchRoleResponse:
    stub = worker_pb2_grpc.WorkerControlStub(grpc.insecure_channel(address))
    return stub.SwitchRole(worker_pb2.SwitchRoleRequest(target_role=target, **fields),
                           timeout=30)


def _roles(store: InMemoryClusterStore) -> dict[str, WorkerRole]:
    return {info.worker_id: info.role for info, _ in store.live_workers()}


def test_switch_round_trip_same_weights_same_tokens(cluster: Cluster, tiny_llama: Path) -> None:
    store, flip, p0, d0 = cluster
    expected = LLM(model=str(tiny_llama), num_kv_blocks=64, block_size=8).generate(
        PROMPT, GREEDY)[0].token_ids
    engine = flip.core.engine
    model, pool = engine.runner.model, engine.runner.kv_pool
    address = flip.address
    assert _generate(address, "f", d0.address, "r1") == expected  # f prefills

    response = _switch(address, DECODE)
    assert (response.worker_id, response.previous_role, response.role) == ("f", PREFILL, DECODE)
    assert response.switched and response.num_aborted_requests == 0
    assert _roles(store) == {"f": WorkerRole.DECODE, "p0": WorkerRole.PREFILL,
                             "d0": WorkerRole.DECODE}
    assert flip.address == address and flip.role == "decode"
    with pytest.raises(grpc.RpcError) as refused:  # the old role's service is closed
        worker_pb2_grpc.PrefillWorkerStub(grpc.insecure_channel(address)).Stats(
            worker_pb2.PrefillStatsRequest())
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "plays the decode role now" in (refused.value.details() or "")
    assert _generate(p0.address, "p0", address, "r2") == expected  # f decodes

    assert _switch(address, PREFILL).switched
    assert _generate(address, "f", d0.address, "r3") == expected  # f prefills again
    # Nothing was rebuilt below the role: the same engine, weights and KV pool.
    assert flip.core.engine is engine and engine.runner.model is model
    assert engine.runner.kv_pool.data_ptr() == pool.data_ptr()
    assert flip.num_switches == 2
    assert flip.core.loop.call(lambda e: e.block_manager.num_free_blocks) == 64
    # Already in the target role: nothing to do.
    again = _switch(address, PREFILL)
    assert not again.switched and again.role == PREFILL
    with pytest.raises(grpc.RpcError) as bad:
        _switch(address, common_pb2.WORKER_ROLE_UNSPECIFIED)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_second_switch_is_refused_while_one_runs(cluster: Cluster) -> None:
    store, flip, p0, d0 = cluster
    assert _switch(flip.address, DECODE).switched
    # A request waiting for KV that never comes keeps the decode role busy: the switch
    # waits out its drain timeout, then hands the request back.
    dstub = worker_pb2_grpc.DecodeWorkerStub(grpc.insecure_channel(flip.address))
    stream = dstub.Admit(worker_pb2.AdmitRequest(
        request_id="stuck", prompt_token_ids=PROMPT, sampling_params=sampling_to_proto(GREEDY),
        prefill_worker_id="nobody", prefill_timeout_ms=30000))
    assert next(stream).admission.accepted
    results: list[worker_pb2.SwitchRoleResponse] = []
    first = threading.Thread(target=lambda: results.append(
        _switch(flip.address, PREFILL, drain_timeout_ms=1500)))
    first.start()
    deadline = time.monotonic() + 10
    # (leaving is set before the new role is built and registered: wait for all three)
    while not (flip.leaving is not None and flip.role == "prefill"
               and _roles(store).get("f") is WorkerRole.PREFILL):
        assert time.monotonic() < deadline, "the switch never started serving as prefill"
        time.sleep(0.01)
    # Serving as prefill already, while the decode role it leaves drains: both answer.
    stats = worker_pb2_grpc.PrefillWorkerStub(grpc.insecure_channel(flip.address)).Stats(
        worker_pb2.PrefillStatsRequest())
    assert stats.role == PREFILL and not stats.draining
    assert dstub.Stats(worker_pb2.DecodeStatsRequest()).role == DECODE
    with pytest.raises(grpc.RpcError) as busy:
        _switch(flip.address, DECODE)
    assert busy.value.code() == grpc.StatusCode.ABORTED
    assert "already switching role (decode -> prefill" in (busy.value.details() or "")
    first.join(30)
    (response,) = results
    assert response.switched and response.role == PREFILL and response.rebuild_ms < 1000
    assert response.num_aborted_requests == 1 and response.drain_ms >= 1500
    (last,) = list(stream)  # handed back to the router, which resumes it elsewhere
    assert last.output.migrate and last.output.finish_reason == common_pb2.FINISH_REASON_ABORT
    assert flip.leaving is None
    with pytest.raises(grpc.RpcError) as closed:
        dstub.Stats(worker_pb2.DecodeStatsRequest())
    assert closed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert flip.core.loop.call(lambda e: e.block_manager.num_free_blocks) == 64


def test_the_last_worker_of_a_role_is_not_switched(cluster: Cluster) -> None:
    store, flip, p0, d0 = cluster
    assert _switch(flip.address, DECODE).switched
    d0.drain()  # d0 leaves: f is the last decode worker
    with pytest.raises(grpc.RpcError) as last:
        _switch(flip.address, PREFILL)
    assert last.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "last live decode worker" in (last.value.details() or "")
    assert _roles(store) == {"f": WorkerRole.DECODE, "p0": WorkerRole.PREFILL}
    assert _switch(flip.address, PREFILL, allow_last_of_role=True).switched
    assert _roles(store) == {"f": WorkerRole.PREFILL, "p0": WorkerRole.PREFILL}


def test_switch_role_needs_the_cluster_token(tiny_llama: Path) -> None:
    options = WorkerOptions(engine=_engine(tiny_llama), kv_backend="inproc",
                            worker_id="t", cluster_token="a-long-enough-cluster-token")
    flip = FlippableWorker(options, ROLES, "decode", InMemoryClusterStore()).start()
    try:
        with pytest.raises(grpc.RpcError) as refused:
            _switch(flip.address, PREFILL, allow_last_of_role=True)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert flip.role == "decode"
    finally:
        flip.stop(0.2)


def test_the_cli_builds_a_flippable_worker(tiny_llama: Path) -> None:
    """`splitserve prefill|decode --flippable` and `serve --pd-control` go through this."""
    from splitserve.launcher import build_worker

    options = WorkerOptions(engine=_engine(tiny_llama), kv_backend="inproc", worker_id="b")
    worker = build_worker("decode", options, flippable=True)
    try:
        assert isinstance(worker, FlippableWorker) and worker.role == "decode"
    finally:
        worker.stop(0.1)
    plain = build_worker("prefill", options)
    try:
        assert isinstance(plain, PrefillWorker)
    finally:
        plain.stop(0.1)


def test_a_flippable_worker_whose_engine_failed_plays_no_role(cluster: Cluster) -> None:
    """Its engine failed: every service reports NOT_SERVING, it left cluster state, and a
    switch is refused UNAVAILABLE (it never marks a role SERVING again)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    store, flip, _, _ = cluster

    def failing_step() -> list[object]:
        raise RuntimeError("injected engine failure")

    flip.core.engine.step = failing_step  # type: ignore[method-assign]
    flip.core.loop.call(lambda e: e.add_request([5, 6, 7], GREEDY, "poke"))
    assert flip.failed.wait(10)
    deadline = time.monotonic() + 10
    while "f" in {info.worker_id for info, _ in store.live_workers()}:
        assert time.monotonic() < deadline, "the failed worker stayed registered"
        time.sleep(0.02)
    with pytest.raises(grpc.RpcError) as refused:
        _switch(flip.address, DECODE, allow_last_of_role=True)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "engine failed" in (refused.value.details() or "")
    with grpc.insecure_channel(flip.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "splitserve.v1.PrefillWorker", "splitserve.v1.DecodeWorker"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING, service
