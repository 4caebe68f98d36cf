"""Live migration of decode streams (Llumnix-style), in process: the real router and
workers, real gRPC, KV over gloo.

A decode worker drained with migration keeps each running request's KV; the router admits
the continuation on the other decode worker naming the draining one as its KV source, and
DecodeWorker.ShipKV sends the blocks over kvtransfer. Nothing is recomputed, streams stay
token-exact, and every block comes back on both workers. When the held KV is gone before
it ships, the router recomputes instead, and the streams are still exact.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

import splitserve.decode_worker.worker as decode_worker_module
from splitserve.client import Client
from splitserve.common.sampling_params import SamplingParams
from splitserve.llm import LLM
from splitserve.v1 import worker_pb2, worker_pb2_grpc
from tests.service.deployment import Deployment, start_deployment

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(180)]

MAX_TOKENS = 60
ENGINE = {"num_kv_blocks": 128, "block_size": 8, "max_num_batched_tokens": 256}
PROMPTS = [[100 + 7 * i + j for j in range(n)] for i, n in enumerate([5, 30, 41, 12, 66, 20])]


@pytest.fixture
def deployment(tiny_llama: Path) -> Iterator[Deployment]:
    dep = start_deployment(str(tiny_llama), 1, 2, engine=ENGINE,
                           router={"local_prefill_threshold": 16})
    yield dep
    dep.stop()


def _resumes(dep: Deployment, reason: str) -> int:
    value = dep.router.metrics.registry.get_sample_value(
        "splitserve_request_resumes_total", {"reason": reason})
    return int(value or 0)


def _drain_mid_stream(dep: Deployment, tiny_llama: Path, max_tokens: int = MAX_TOKENS) -> None:
    """Greedy and seeded streams; decode-0 drains with migration once every stream has 5
    tokens. Each stream must equal the colocated engine's output."""
    sampling = [{"temperature": 0.0} if i % 2 else {"temperature": 0.8, "top_k": 40,
                                                      "seed": 7 + i} for i in range(6)]
    llm = LLM(model=str(tiny_llama), num_kv_blocks=128, block_size=8)
    expected = [llm.generate([p], SamplingParams(max_tokens=max_tokens, ignore_eos=True, **s))
                [0].token_ids for p, s in zip(PROMPTS, sampling, strict=True)]
    counts = [0] * len(PROMPTS)
    ready = threading.Event()

    def run(i: int) -> list[int]:
        tokens: list[int] = []
        with Client(dep.address, timeout=60, max_retries=0) as client:
            for chunk in client.stream(PROMPTS[i], max_tokens=max_tokens, ignore_eos=True,
                                       **sampling[i]):
                tokens.extend(chunk.token_ids)
                counts[i] = len(tokens)
                if min(counts) >= 5:
                    ready.set()
                if chunk.finish_reason:
                    assert chunk.finish_reason == "length", chunk.error_message
                    assert chunk.usage is not None
                    assert chunk.usage.completion_tokens == max_tokens
        return tokens

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(run, i) for i in range(len(PROMPTS))]
        assert ready.wait(60), counts
        left = dep.decode[0].drain(30, migrate=True)
        got = [f.result(60) for f in futures]
    assert left == 0
    for i, (tokens, want) in enumerate(zip(got, expected, strict=True)):
        assert tokens == want, f"stream {i} ({sampling[i]})"
    state = dep.wait_all_blocks_free()
    assert all(free == total for free, total in state.values()), state


def test_drain_ships_the_kv_of_running_streams(deployment: Deployment,
                                              tiny_llama: Path) -> None:
    _drain_mid_stream(deployment, tiny_llama)
    migrated = _resumes(deployment, "decode_migrated")
    assert migrated >= 1 and _resumes(deployment, "decode_lost") == 0
    shipped = deployment.decode[0].kv.stats()
    received = deployment.decode[1].kv.stats()
    assert shipped.transfers_ok >= migrated and shipped.bytes_sent > 0
    assert received.bytes_received >= shipped.bytes_sent  # D-1 also took P's prompts


def test_no_room_to_receive_the_kv_recomputes_on_the_new_worker(tiny_llama: Path) -> None:
    """decode-1's pool holds one continuation at most: the others find no blocks to receive
    their KV into, and are prefilled in decode-1's own queue instead (waiting for blocks);
    none repeats the token whose KV would have been its first input."""
    dep = start_deployment(str(tiny_llama), 1, 2, engine=ENGINE,
                           router={"local_prefill_threshold": 16},
                           engine_overrides={"decode-1": {"num_kv_blocks": 20}})
    try:
        _drain_mid_stream(dep, tiny_llama)
        assert _resumes(dep, "decode_drained") >= 1  # some could not ship
        assert _resumes(dep, "decode_lost") == 0
    finally:
        dep.stop()


def test_kv_gone_before_it_ships_is_recomputed(deployment: Deployment, tiny_llama: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode_worker_module, "_PARK_S", -1.0)  # expires at once
    _drain_mid_stream(deployment, tiny_llama)
    assert _resumes(deployment, "decode_drained") >= 1
    assert _resumes(deployment, "decode_lost") == 0


def test_ship_kv_refuses_what_it_does_not_hold(deployment: Deployment) -> None:
    worker = deployment.decode[0]
    with grpc.insecure_channel(worker.address) as channel:
        stub = worker_pb2_grpc.DecodeWorkerStub(channel)
        stats = stub.Stats(worker_pb2.DecodeStatsRequest(), timeout=10)
        request = worker_pb2.ShipKVRequest(
            request_id="nobody", transfer_request_id="nobody.1", dst_worker_id="decode-1",
            dst_kv_endpoint=deployment.decode[1].kv_endpoint, dst_block_ids=[1],
            kv_layout=stats.kv_layout)
        with pytest.raises(grpc.RpcError) as info:
            stub.ShipKV(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "holds no KV of request 'nobody'" in (info.value.details() or "")
        request.kv_layout.block_size = stats.kv_layout.block_size * 2
        with pytest.raises(grpc.RpcError) as info:
            stub.ShipKV(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "block_size" in (info.value.details() or "")
