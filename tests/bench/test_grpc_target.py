"""The grpc:// target through the real SDK and real gRPC on loopback.

`TokenRouter` is a minimal implementation of the public splitserve.v1.SplitServe service
that streams `max_tokens` tokens in chunks of two; it stands in for the router so that the
harness's use of the SDK (chunk timestamps, exact token counts, usage, server timings,
errors) is checked here. Tests against the real SplitServe service live with the lead.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from splitserve.bench import serve
from splitserve.v1 import common_pb2, router_pb2, router_pb2_grpc


class TokenRouter(router_pb2_grpc.SplitServeServicer):
    def __init__(self) -> None:
        self.requests: list[router_pb2.GenerateRequest] = []
        self.lock = threading.Lock()

    def Generate(self, request: router_pb2.GenerateRequest, context: Any
                 ) -> Iterator[router_pb2.GenerateResponse]:
        with self.lock:
            self.requests.append(request)
        if request.WhichOneof("input") == "prompt" and request.prompt.startswith("FAIL"):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "over capacity")
        n = request.sampling_params.max_tokens
        for start in range(0, n, 2):
            time.sleep(0.002)
            ids = list(range(start, min(start + 2, n)))
            yield router_pb2.GenerateResponse(token_ids=ids, text="x" * len(ids))
        yield router_pb2.GenerateResponse(
            finish_reason=common_pb2.FINISH_REASON_LENGTH,
            usage=common_pb2.Usage(prompt_tokens=17, completion_tokens=n, cached_tokens=3),
            timings=common_pb2.RequestTimings(ttft_ms=4.5, e2e_ms=9.0, prefill_worker_id="p0",
                                              decode_worker_id="d0", kv_transfer_bytes=128))


@pytest.fixture
def router() -> Iterator[tuple[TokenRouter, str]]:
    servicer = TokenRouter()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    router_pb2_grpc.add_SplitServeServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"grpc://127.0.0.1:{port}"
    finally:
        server.stop(0)


def test_grpc_target_records_exact_tokens_and_server_timings(
        router: tuple[TokenRouter, str], tmp_path: Path) -> None:
    servicer, url = router
    out = tmp_path / "g.json"
    rc = serve.main(["--target", url, "--workload", "fixed", "--input-len", "12",
                     "--output-len", "5", "--num-requests", "6", "--concurrency", "3",
                     "--no-progress", "--out", str(out)])
    assert rc == 0 and len(servicer.requests) == 6
    sent = servicer.requests[0]
    assert sent.WhichOneof("input") == "prompt" and len(sent.prompt.split()) == 12
    params = sent.sampling_params
    assert (params.max_tokens, params.temperature, params.ignore_eos) == (5, 0.0, True)
    data = json.loads(out.read_text())
    record = data["requests"][0]
    assert record["chunk_tokens"] == [2, 2, 1]  # exact counts; the last chunk has none
    assert record["output_tokens"] == 5 and record["prompt_tokens"] == 17
    assert record["server_timings"]["decode_worker_id"] == "d0"
    assert record["server_timings"]["kv_transfer_bytes"] == 128
    s = data["summary"]
    assert s["completed"] == 6 and s["total_output_tokens"] == 30
    assert s["itl_ms"]["count"] == 6 * 3  # chunks of 2 tokens: the gap is spread over both


def test_grpc_chat_and_errors(router: tuple[TokenRouter, str], tmp_path: Path) -> None:
    servicer, url = router
    dataset = tmp_path / "d.jsonl"
    dataset.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
                       + json.dumps({"prompt": "FAIL please", "max_tokens": 3}) + "\n")
    out = tmp_path / "e.json"
    rc = serve.main(["--target", url, "--dataset", str(dataset), "--output-len", "4",
                     "--num-requests", "4", "--no-progress", "--out", str(out)])
    assert rc == 0
    kinds = sorted(r.WhichOneof("input") for r in servicer.requests)
    assert kinds == ["messages", "messages", "prompt", "prompt"]
    s = json.loads(out.read_text())["summary"]
    assert (s["completed"], s["failed"]) == (2, 2)
    assert list(s["errors"]) == ["Overloaded: RESOURCE_EXHAUSTED: over capacity"]
