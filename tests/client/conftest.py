"""A scripted SplitServe server for the SDK's tests.

`ScriptedRouter` is a small, real implementation of the public `splitserve.v1.SplitServe`
servicer served over real gRPC on loopback: it replays a script of response chunks and
records what reached it (requests, metadata, cancellation). It stands in for the router,
an external peer of the SDK; end-to-end tests against the real router live elsewhere.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from splitserve.client import AsyncClient, Client, Timings, Usage
from splitserve.v1 import common_pb2, router_pb2, router_pb2_grpc

TIMINGS = common_pb2.RequestTimings(
    router_queue_ms=1.5, prefill_queue_ms=2.25, prefill_compute_ms=10.0, kv_transfer_ms=0.5,
    decode_queue_ms=0.75, ttft_ms=15.0, e2e_ms=42.0, prefill_worker_id="p0",
    decode_worker_id="d1", prefill_local=False, kv_transfer_bytes=4096,
)
USAGE = common_pb2.Usage(prompt_tokens=5, completion_tokens=4, cached_tokens=2)


def hello_chunks() -> list[router_pb2.GenerateResponse]:
    """'Hello world' in three token chunks, then a last chunk with no tokens."""
    return [
        router_pb2.GenerateResponse(token_ids=[11, 12], text="Hel"),
        router_pb2.GenerateResponse(token_ids=[13], text="lo"),
        router_pb2.GenerateResponse(token_ids=[14], text=" world"),
        router_pb2.GenerateResponse(finish_reason=common_pb2.FINISH_REASON_STOP, usage=USAGE,
                                    timings=TIMINGS),
    ]


def hello_partial() -> list[router_pb2.GenerateResponse]:
    return [router_pb2.GenerateResponse(token_ids=[11, 12], text="Hel"),
            router_pb2.GenerateResponse(token_ids=[13], text="lo")]


EXPECTED_TIMINGS = Timings(
    router_queue_ms=1.5, prefill_queue_ms=2.25, prefill_compute_ms=10.0, kv_transfer_ms=0.5,
    decode_queue_ms=0.75, ttft_ms=15.0, e2e_ms=42.0, prefill_worker_id="p0",
    decode_worker_id="d1", prefill_local=False, kv_transfer_bytes=4096,
)
EXPECTED_USAGE = Usage(prompt_tokens=5, completion_tokens=4, cached_tokens=2)


@dataclass
class Script:
    """What the next Generate calls do."""

    chunks: list[router_pb2.GenerateResponse] = field(default_factory=hello_chunks)
    chunk_delay_s: float = 0.0
    fail_first: int = 0  # the first N calls abort with fail_code before sending anything
    abort_after: int | None = None  # every call aborts with fail_code after this many chunks
    fail_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    fail_message: str = "no live worker"
    hold: bool = False  # after the chunks, keep the call open until the client leaves


class ScriptedRouter(router_pb2_grpc.SplitServeServicer):
    def __init__(self) -> None:
        self.script = Script()
        self.models = [router_pb2.ModelInfo(id="smollm2-135m", max_model_len=2048,
                                            block_size=16, num_prefill_workers=2,
                                            num_decode_workers=1)]
        self.requests: list[router_pb2.GenerateRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.list_models_calls = 0
        self.cancelled = threading.Event()  # set when a client left a call before its end
        self._lock = threading.Lock()

    @property
    def attempts(self) -> int:
        return len(self.requests)

    def Generate(self, request: router_pb2.GenerateRequest, context: Any
                 ) -> Iterator[router_pb2.GenerateResponse]:
        with self._lock:
            self.requests.append(request)
            self.metadata.append({k: v for k, v in context.invocation_metadata()})
            attempt = len(self.requests)
        s = self.script
        finished = threading.Event()  # the server ended the call itself (chunks or abort)

        def on_termination() -> None:  # runs however the RPC ends
            if not finished.is_set():
                self.cancelled.set()

        context.add_callback(on_termination)
        if attempt <= s.fail_first:
            finished.set()
            context.abort(s.fail_code, s.fail_message)
        for i, chunk in enumerate(s.chunks):
            if s.abort_after == i:
                finished.set()
                context.abort(s.fail_code, s.fail_message)
            time.sleep(s.chunk_delay_s)
            out = router_pb2.GenerateResponse()
            out.CopyFrom(chunk)
            out.request_id = request.request_id or f"router-{attempt}"
            yield out
        if s.abort_after == len(s.chunks):
            finished.set()
            context.abort(s.fail_code, s.fail_message)
        if s.hold:  # until the client cancels or its deadline passes (then on_termination)
            deadline = time.monotonic() + 20
            while context.is_active() and time.monotonic() < deadline:
                time.sleep(0.005)
        else:
            finished.set()

    def ListModels(self, request: router_pb2.ListModelsRequest, context: Any
                   ) -> router_pb2.ListModelsResponse:
        with self._lock:
            self.list_models_calls += 1
            calls = self.list_models_calls
        if calls <= self.script.fail_first:
            context.abort(self.script.fail_code, self.script.fail_message)
        return router_pb2.ListModelsResponse(models=self.models)


@dataclass
class Served:
    servicer: ScriptedRouter
    address: str


def serve(servicer: ScriptedRouter, credentials: grpc.ServerCredentials | None = None
          ) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    router_pb2_grpc.add_SplitServeServicer_to_server(servicer, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def router() -> Iterator[Served]:
    servicer = ScriptedRouter()
    server, address = serve(servicer)
    try:
        yield Served(servicer, address)
    finally:
        server.stop(None)


def spy_on_calls(client: Client | AsyncClient) -> list:
    """Keep every Generate call object alive, so that only the SDK's own cancel() (not
    grpc's cancel-on-garbage-collection) can end a call the client left."""
    calls: list = []
    generate = client._stub.Generate

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(generate(*args, **kwargs))
        return calls[-1]

    client._stub.Generate = spy
    return calls
