"""Prefill and decode workers over real gRPC, driven by hand through the life cycle in
worker.proto (the router does the same; tests/service covers it end to end)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from splitserve.cli import build_parser
from splitserve.cluster.memory import InMemoryClusterStore
from splitserve.common.convert.common import sampling_to_proto
from splitserve.common.sampling_params import SamplingParams
from splitserve.decode_worker.worker import DecodeWorker
from splitserve.engine.config import EngineConfig
from splitserve.llm import LLM
from splitserve.prefill_worker import worker as prefill_worker_module
from splitserve.prefill_worker.worker import PrefillWorker
from splitserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from splitserve.worker.core import KV_SEND_MODES
from splitserve.worker.runtime import WorkerOptions

PROMPTS = [[5, 6, 7], list(range(300, 341)), [11] * 17, list(range(1000, 1064))]


# How the prefill worker sends the KV (WorkerOptions.kv_send): every layer as it is computed,
# all layers at the end, and "auto" with a threshold that sends the prompts of 4 blocks or
# more per layer and the shorter ones whole (on CPU; the real threshold is far above this
# tiny model's prompts).
KV_SEND_CASES = ("layer", "whole", "auto")


@pytest.fixture(scope="module", params=KV_SEND_CASES)
def workers(request: pytest.FixtureRequest, tiny_llama: Path
            ) -> Iterator[tuple[PrefillWorker, DecodeWorker]]:
    store = InMemoryClusterStore()
    engine = EngineConfig(model=str(tiny_llama), num_kv_blocks=64, block_size=8,
                          max_num_batched_tokens=32)
    p = PrefillWorker(WorkerOptions(engine=engine, kv_backend="inproc", worker_id="p0",
                                    kv_send=request.param), store)
    d = DecodeWorker(WorkerOptions(engine=engine, kv_backend="inproc", worker_id="d0"), store)
    threshold = prefill_worker_module.KV_LAYER_MESSAGE_MIN_BYTES
    prefill_worker_module.KV_LAYER_MESSAGE_MIN_BYTES = 4 * p.layout.bytes_per_block_per_layer
    p.start()
    d.start()
    yield p, d
    p.stop()
    d.stop()
    prefill_worker_module.KV_LAYER_MESSAGE_MIN_BYTES = threshold


def test_kv_send_must_be_a_known_mode() -> None:
    with pytest.raises(ValueError, match="kv_send must be one of"):
        WorkerOptions(kv_send="per-block")
    parser = build_parser()
    for mode in KV_SEND_MODES:  # the CLI offers exactly the modes WorkerOptions takes
        assert parser.parse_args(["prefill", "--cluster", "grpc://r:1", "--kv-send", mode]).kv_send == mode
    with pytest.raises(SystemExit):
        parser.parse_args(["prefill", "--cluster", "grpc://r:1", "--kv-send", "per-block"])


def test_kv_send_modes_pick_per_layer_or_whole(workers) -> None:  # type: ignore[no-untyped-def]
    p, _ = workers
    per_layer = {n: p._sends_per_layer(n) for n in (1, 3, 4, 9)}
    expected = {"layer": [True] * 4, "whole": [False] * 4, "auto": [False, False, True, True]}
    assert list(per_layer.values()) == expected[p.options.kv_send]


def _generate(p: PrefillWorker, d: DecodeWorker, prompt: list[int], rid: str,
              params: SamplingParams) -> tuple[list[int], int]:
    dstub = worker_pb2_grpc.DecodeWorkerStub(grpc.insecure_channel(d.address))
    pstub = worker_pb2_grpc.PrefillWorkerStub(grpc.insecure_channel(p.address))
    stream = dstub.Admit(worker_pb2.AdmitRequest(
        request_id=rid, prompt_token_ids=prompt, sampling_params=sampling_to_proto(params),
        prefill_worker_id=p.worker_id, prefill_timeout_ms=20000,
    ))
    admission = next(stream).admission
    assert admission.accepted, admission.refusal_message
    first = pstub.Prefill(worker_pb2.PrefillRequest(
        request_id=rid, prompt_token_ids=prompt, sampling_params=sampling_to_proto(params),
        decode_worker_id=admission.decode_worker_id, decode_block_ids=admission.block_ids,
        kv_layout=admission.kv_layout,
    ), timeout=30)
    assert first.kv_transfer_bytes > 0
    dstub.PrefillDone(worker_pb2.PrefillDoneRequest(request_id=rid,
                                                    first_token_id=first.first_token_id))
    tokens = [first.first_token_id]
    reason = 0
    for message in stream:
        tokens.extend(message.output.token_ids)
        reason = message.output.finish_reason
    return tokens, reason


def test_disaggregated_tokens_equal_colocated(workers, tiny_llama: Path) -> None:  # type: ignore[no-untyped-def]
    p, d = workers
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    expected = LLM(model=str(tiny_llama), num_kv_blocks=64, block_size=8).generate(PROMPTS, params)
    for i, prompt in enumerate(PROMPTS):
        tokens, reason = _generate(p, d, prompt, f"r{i}", params)
        assert tokens == expected[i].token_ids
        assert reason == common_pb2.FINISH_REASON_LENGTH
    assert d.loop.call(lambda e: e.block_manager.num_free_blocks) == 64
    assert p.loop.call(lambda e: e.block_manager.num_free_blocks) == 64


def test_seeded_sampling_continues_across_workers(workers, tiny_llama: Path) -> None:  # type: ignore[no-untyped-def]
    p, d = workers
    params = SamplingParams(temperature=0.8, top_k=50, seed=1234, max_tokens=10, ignore_eos=True)
    expected = LLM(model=str(tiny_llama), num_kv_blocks=64, block_size=8).generate(PROMPTS[1], params)
    tokens, _ = _generate(p, d, PROMPTS[1], "seeded", params)
    assert tokens == expected[0].token_ids


def test_health_and_reflection_on_both_workers(workers) -> None:  # type: ignore[no-untyped-def]
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    for worker, service in zip(workers, ("splitserve.v1.PrefillWorker",
                                         "splitserve.v1.DecodeWorker"), strict=True):
        with grpc.insecure_channel(worker.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", service):
                status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert status.status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            responses = stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
            names = {s.name for r in responses for s in r.list_services_response.service}
            assert service in names and "grpc.health.v1.Health" in names


@pytest.mark.parametrize(("role", "method", "streaming"), [
    (0, "/splitserve.v1.PrefillWorker/Prefill", False),
    (0, "/splitserve.v1.PrefillWorker/Stats", False),
    (1, "/splitserve.v1.DecodeWorker/Admit", True),
    (1, "/splitserve.v1.DecodeWorker/Abort", False),
])
def test_undecodable_requests_are_invalid_argument(  # type: ignore[no-untyped-def]
        workers, role: int, method: str, streaming: bool) -> None:
    with grpc.insecure_channel(workers[role].address) as channel:
        kind = channel.unary_stream if streaming else channel.unary_unary
        call = kind(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as info:
            result = call(b"\x0a\xff\xff\xff\xff\x0f", timeout=10)
            if streaming:
                list(result)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert "does not decode" in info.value.details()
        stub = (worker_pb2_grpc.PrefillWorkerStub if role == 0 else
                worker_pb2_grpc.DecodeWorkerStub)(channel)
        request = worker_pb2.PrefillStatsRequest() if role == 0 else worker_pb2.DecodeStatsRequest()
        stub.Stats(request, timeout=10)  # and it still serves well-formed calls
