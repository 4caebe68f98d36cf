"""Backend-specific facts the shared contract cannot see: URLs, wire status codes, Redis keys."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.cluster import InMemoryClusterStore, codec, open_store
from splitserve.cluster.redis_store import RedisClusterStore
from splitserve.cluster.remote import RemoteClusterStore, start_cluster_state_server
from splitserve.cluster.store import (
    RequestLedgerEntry,
    RequestPhase,
    WorkerInfo,
    WorkerLoadReport,
    WorkerRole,
)
from splitserve.common.convert.cluster import load_from_proto, load_to_proto
from splitserve.common.step_time import StepTimeModel
from splitserve.v1 import cluster_pb2, cluster_pb2_grpc, common_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]

INFO = WorkerInfo(
    worker_id="d0",
    role=WorkerRole.DECODE,
    address="127.0.0.1:7001",
    model="m",
    block_size=16,
    num_total_blocks=64,
    started_at=12.5,
)


def test_open_store_picks_backend_from_url() -> None:
    assert isinstance(open_store(None), InMemoryClusterStore)
    assert isinstance(open_store("memory"), InMemoryClusterStore)
    redis_store = open_store("redis://127.0.0.1:1/0")  # redis-py connects lazily
    assert isinstance(redis_store, RedisClusterStore)
    redis_store.close()
    remote = open_store("grpc://127.0.0.1:1")  # gRPC channels connect lazily
    assert isinstance(remote, RemoteClusterStore)
    remote.close()
    for bad in ("grpc://", "http://x:1", "memory://", ""):
        with pytest.raises(ValueError):
            open_store(bad)


def test_cluster_package_imports_neither_torch_nor_workers() -> None:
    code = (
        "import sys, json\n"
        "import splitserve.cluster, splitserve.cluster.redis_store, splitserve.cluster.remote\n"
        "heavy = ('torch', 'ray', 'splitserve.engine', 'splitserve.router',\n"
        "         'splitserve.prefill_worker', 'splitserve.decode_worker')\n"
        "print(json.dumps(sorted(m for m in sys.modules\n"
        "                        if any(m == h or m.startswith(h + '.') for h in heavy))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


@pytest.fixture()
def served_store() -> Iterator[tuple[InMemoryClusterStore, grpc.Channel]]:
    store = InMemoryClusterStore()
    server, port = start_cluster_state_server(store)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield store, channel
    finally:
        channel.close()
        server.stop(grace=None)


def test_servicer_maps_invalid_arguments_to_status(
    served_store: tuple[InMemoryClusterStore, grpc.Channel],
) -> None:
    _, channel = served_store
    stub = cluster_pb2_grpc.ClusterStateStub(channel)
    info = cluster_pb2.WorkerInfo(
        worker_id="w", role=common_pb2.WORKER_ROLE_DECODE, address="a", block_size=16
    )
    with pytest.raises(grpc.RpcError) as zero_ttl:
        stub.RegisterWorker(cluster_pb2.RegisterWorkerRequest(info=info, ttl_ms=0), timeout=5)
    assert zero_ttl.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    no_role = cluster_pb2.WorkerInfo(worker_id="w", address="a", block_size=16)
    with pytest.raises(grpc.RpcError) as unset_role:
        stub.RegisterWorker(cluster_pb2.RegisterWorkerRequest(info=no_role, ttl_ms=1000), timeout=5)
    assert unset_role.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as unset_phase:
        entry = cluster_pb2.RequestLedgerEntry(request_id="r")
        stub.LedgerPut(cluster_pb2.LedgerPutRequest(entry=entry), timeout=5)
    assert unset_phase.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_server_reports_health_and_serves_what_the_store_holds(
    served_store: tuple[InMemoryClusterStore, grpc.Channel],
) -> None:
    store, channel = served_store
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "splitserve.v1.ClusterState"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    store.register_worker(INFO, 60.0)  # written in-process, read over the wire
    stub = cluster_pb2_grpc.ClusterStateStub(channel)
    reply = stub.LiveWorkers(cluster_pb2.LiveWorkersRequest(), timeout=5)
    assert [w.info.worker_id for w in reply.workers] == ["d0"]
    assert not reply.workers[0].HasField("load")


def test_redis_keys_are_namespaced_plain_strings_with_ttl(redis_url: str) -> None:
    import redis

    store = RedisClusterStore(redis_url, namespace="ns-check:")
    raw = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        before = set(raw.keys("*"))
        store.register_worker(INFO, 30.0)
        store.heartbeat("d0", WorkerLoadReport(1, 2, 3, 4, updated_at=9.25), 30.0)
        store.publish_prefix_events("d0", [2**64 - 1, 5], [])
        store.ledger_put(RequestLedgerEntry("r1", RequestPhase.ADMITTED, decode_worker_id="d0"))
        new_keys = set(raw.keys("*")) - before
        assert new_keys == {
            "ns-check:worker:d0",
            "ns-check:workers",
            "ns-check:worker_prefix:d0",
            "ns-check:prefix:18446744073709551615",
            "ns-check:prefix:5",
            "ns-check:ledger:r1",
            "ns-check:ledger_worker:d0",
            "ns-check:prefix_log",  # the prefix index's change log (cluster.prefix_mirror)
            "ns-check:prefix_seq",
        }
        worker = raw.hgetall("ns-check:worker:d0")
        assert worker["role"] == "decode" and worker["load.num_free_blocks"] == "3"
        assert worker["load.updated_at"] == "9.25"
        assert 0 < raw.pttl("ns-check:worker:d0") <= 30_000
        assert raw.smembers("ns-check:prefix:5") == {"d0"}
        store.deregister_worker("d0")
        store.ledger_delete("r1")
        # Nothing stranded (empty sets vanish); the log is bounded (prefix_log_len).
        assert sorted(raw.keys("ns-check:*")) == ["ns-check:prefix_log", "ns-check:prefix_seq"]
        entries = raw.xrange("ns-check:prefix_log")
        assert [e[1] for e in entries] == [
            {"n": "1", "w": "d0", "drop": "1"},  # register: whatever d0 held is gone
            {"n": "2", "w": "d0", "t": "device", "s": "18446744073709551615 5", "e": ""},
            {"n": "3", "w": "d0", "drop": "1"},
        ]
    finally:
        for key in raw.keys("ns-check:*"):
            raw.delete(key)
        raw.close()
        store.close()


def test_redis_live_workers_decodes_only_what_changed(redis_url: str) -> None:
    """A read of the live workers decodes a worker's hash only when it changed since the
    last read: the same objects otherwise (the router re-indexes only changed workers)."""
    import dataclasses

    store = RedisClusterStore(redis_url, namespace="ns-decode:")
    other = dataclasses.replace(INFO, worker_id="d1", address="127.0.0.1:2")
    try:
        store.register_worker(INFO, 30.0)
        store.register_worker(other, 30.0)
        store.heartbeat("d1", WorkerLoadReport(1, 2, 3, 4, updated_at=9.25), 30.0)
        first = store.live_workers()
        again = store.live_workers()
        assert [w for w, _ in first] == [INFO, other] and first[1][1] is not None
        assert all(a[0] is b[0] and a[1] is b[1] for a, b in zip(first, again, strict=True))
        store.heartbeat("d1", WorkerLoadReport(5, 2, 3, 4, updated_at=9.5), 30.0)
        d0, d1 = store.live_workers()
        assert d0[0] is first[0][0] and d0[1] is first[0][1]  # untouched
        assert d1[0] is first[1][0]  # the same registration: the same info
        assert d1[1] is not None and d1[1].num_waiting == 5
        store.register_worker(dataclasses.replace(other, address="127.0.0.1:3"), 30.0)
        assert store.live_workers()[1][0].address == "127.0.0.1:3"
        store.deregister_worker("d0")
        assert [w.worker_id for w, _ in store.live_workers(WorkerRole.DECODE)] == ["d1"]
    finally:
        store.deregister_worker("d0")
        store.deregister_worker("d1")
        store.close()
        import redis

        raw = redis.Redis.from_url(redis_url)
        for key in raw.keys("ns-decode:*"):
            raw.delete(key)
        raw.close()


def test_tier_runs_fall_back_to_device_runs_of_an_older_server() -> None:
    """A cluster-state server from before the KV tiers ignores with_tiers and answers only
    num_cached_blocks: those are device runs, and kv_aware routing keeps working."""
    from splitserve.cluster.store import PrefixOverlap
    from splitserve.v1 import cluster_pb2

    remote = RemoteClusterStore("127.0.0.1:1")
    old = cluster_pb2.PrefixOverlapResponse(num_cached_blocks={"d0": 3, "d1": 1})
    remote._call = lambda rpc, request: old  # type: ignore[method-assign]
    try:
        assert remote.prefix_overlap_tiers([1, 2, 3]) == {
            "d0": PrefixOverlap(3, 0, 0), "d1": PrefixOverlap(1, 0, 0)}
    finally:
        remote.close()


def test_an_unknown_kv_tier_is_refused_not_filed_as_device() -> None:
    from splitserve.cluster.memory import InMemoryClusterStore
    from splitserve.cluster.remote import ClusterStateServicer
    from splitserve.v1 import cluster_pb2

    store = InMemoryClusterStore()
    servicer = ClusterStateServicer(store)
    request = cluster_pb2.PublishPrefixEventsRequest(worker_id="w", stored_hashes=[5], tier=9)

    class Context:
        def abort(self, code, message):  # type: ignore[no-untyped-def]
            raise RuntimeError(f"{code}: {message}")

    with pytest.raises(RuntimeError, match="unknown KV tier"):
        servicer.PublishPrefixEvents(request, Context())
    assert store.prefix_overlap([5]) == {}


def test_the_redis_decoder_sees_a_change_of_any_registration_field() -> None:
    """WorkerDecoder keeps a worker's decoded registration while its fields are unchanged:
    the fields it compares are all of WorkerInfo's (a changed output channel endpoint alone
    reaches the router), and an older hash without a newer field decodes to its default."""
    assert set(codec._INFO_FIELDS) == {f.name for f in dataclasses.fields(WorkerInfo)}
    decoder = codec.WorkerDecoder()

    def read(info: WorkerInfo) -> WorkerInfo:
        flat = [x for pair in codec.encode_info(info).items() for x in pair]
        [(decoded, _)], gone = decoder.decode([(info.worker_id, flat)])
        assert not gone
        return decoded

    first = dataclasses.replace(INFO, output_endpoint="10.0.0.1:2")
    assert read(first).output_endpoint == "10.0.0.1:2"
    assert read(dataclasses.replace(first, output_endpoint="10.0.0.1:3")).output_endpoint == (
        "10.0.0.1:3")
    older = {k: v for k, v in codec.encode_info(first).items() if k != "output_endpoint"}
    [(decoded, _)], _ = codec.WorkerDecoder().decode(
        [(first.worker_id, [x for pair in older.items() for x in pair])])
    assert decoded.output_endpoint == ""


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_step_time_model_that_is_not_finite_is_no_model(bad: float) -> None:
    """Made in a worker, or decoded from Redis or from the gRPC cluster state: a report's
    model with a NaN or infinite cost is dropped (its predictions would be NaN or infinite,
    and the latency policy would route on them); a finite one is kept."""
    good = StepTimeModel(base_ms=3.25, per_seq_ms=0.125, per_prompt_token_ms=0.0625,
                         token_budget=2048)
    for field in ("base_ms", "per_seq_ms", "per_prompt_token_ms"):
        model = dataclasses.replace(good, **{field: bad})
        assert WorkerLoadReport(num_running=2, step_model=model).step_model is None
        # The wire forms carry what a worker (or a corrupt entry) wrote, before any report.
        text = ",".join((repr(model.base_ms), repr(model.per_seq_ms),
                         repr(model.per_prompt_token_ms), str(model.token_budget)))
        fields = {**codec.encode_load(WorkerLoadReport(num_running=2, step_model=good)),
                  "load.step_model": text}
        decoded = codec.decode_load(fields)
        assert decoded is not None and decoded.num_running == 2 and decoded.step_model is None
        msg = load_to_proto(WorkerLoadReport(num_running=2, step_model=good))
        setattr(msg.step_model, field, bad)
        assert load_from_proto(msg).step_model is None
    assert WorkerLoadReport(step_model=good).step_model == good
