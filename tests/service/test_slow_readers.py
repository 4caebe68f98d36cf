"""A reader that stops reading is cut off; the engine and the other streams never wait.

Two places hold a stream's output: the decode worker's per-request queue (bounded by
WorkerOptions.max_output_backlog) and the router's write to its client (bounded in time by
RouterConfig.client_write_timeout_s). Both are driven here by readers that stop for real:
a request whose output queue nobody drains, and an HTTP client whose socket stops being
read.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitserve.cluster.memory import InMemoryClusterStore
from splitserve.common.sampling_params import SamplingParams
from splitserve.decode_worker.worker import DecodeRequest, DecodeWorker
from splitserve.engine.config import EngineConfig
from splitserve.worker.runtime import WorkerOptions
from tests.service.deployment import Deployment, start_deployment

NUM_BLOCKS = 64


def _drain(request: DecodeRequest, timeout_s: float = 60.0) -> tuple[list[int], str | None]:
    """Read a request's events to its end: (tokens, finish reason or the error)."""
    tokens: list[int] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        event = request.events.get(timeout=deadline - time.monotonic())
        if event.error is not None:
            return tokens, event.error
        assert event.output is not None
        tokens.extend(event.output.new_token_ids)
        if event.output.finished:
            return tokens, event.output.finish_reason
    raise TimeoutError("the request did not end")


def _worker(tiny_llama: Path, max_output_backlog: int) -> Iterator[DecodeWorker]:
    engine = EngineConfig(model=str(tiny_llama), num_kv_blocks=NUM_BLOCKS, block_size=8,
                          max_num_batched_tokens=64)
    d = DecodeWorker(WorkerOptions(engine=engine, kv_backend="inproc", worker_id="d0",
                                   max_output_backlog=max_output_backlog),
                     InMemoryClusterStore())
    d.start()
    yield d
    d.stop()


@pytest.fixture()
def worker(tiny_llama: Path) -> Iterator[DecodeWorker]:
    yield from _worker(tiny_llama, 8)


@pytest.fixture()
def roomy_worker(tiny_llama: Path) -> Iterator[DecodeWorker]:
    """A backlog of 32 outputs: a reader thread descheduled for 8 steps on a loaded machine
    is not one that stopped reading (each request still makes more outputs than that)."""
    yield from _worker(tiny_llama, 32)


def test_unread_stream_is_cut_off_while_the_batch_goes_on(worker: DecodeWorker) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=150, ignore_eos=True)
    stream_ended = threading.Event()
    stuck = worker.admit("stuck", list(range(10, 30)), params, True, "", 30.0)
    stuck.cancel_stream = stream_ended.set  # what the servicer passes: the RPC's cancel
    read = worker.admit("read", list(range(40, 60)), params, True, "", 30.0)

    tokens, reason = _drain(read)
    assert (len(tokens), reason) == (150, "length")  # the reader that reads gets everything
    assert stream_ended.wait(10.0)
    assert worker.num_cut_off == 1
    # The stuck request's queue stopped near the limit and its blocks came back.
    assert stuck.events.qsize() <= 8 + 3
    deadline = time.monotonic() + 10.0
    while worker.loop.call(lambda e: e.block_manager.num_free_blocks) != NUM_BLOCKS:
        assert time.monotonic() < deadline, "the cut-off request kept its blocks"
        time.sleep(0.02)
    assert worker.loop.call(lambda e: "stuck" not in e.requests)
    events = []
    while not stuck.events.empty():
        events.append(stuck.events.get_nowait())
    assert events[-1].error == "the stream stopped reading its output"


def test_readers_that_keep_up_are_never_cut_off(roomy_worker: DecodeWorker) -> None:
    worker = roomy_worker
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    requests = [worker.admit(f"r{i}", list(range(5 + i, 25 + i)), params, True, "", 30.0)
                for i in range(4)]
    results: dict[str, tuple[list[int], str | None]] = {}
    readers = [threading.Thread(target=lambda r=r: results.__setitem__(r.request_id, _drain(r)))
               for r in requests]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(60.0)
    assert {rid: (len(tokens), reason) for rid, (tokens, reason) in results.items()} == {
        f"r{i}": (60, "length") for i in range(4)}
    assert worker.num_cut_off == 0


@pytest.fixture()
def deployment(tiny_llama: Path) -> Iterator[Deployment]:
    d = start_deployment(str(tiny_llama), 0, 1,
                         engine={"num_kv_blocks": NUM_BLOCKS, "block_size": 8},
                         router={"client_write_timeout_s": 0.5, "local_prefill_threshold": 4096})
    yield d
    d.stop()


def _stalled_stream(http_address: str, model: str) -> socket.socket:
    """An HTTP client that sends a long streamed completion with large events, reads the
    first bytes of the response, then stops reading (a small receive buffer fills fast)."""
    host, port = http_address.rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    body = json.dumps({"model": model, "prompt": [7, 8, 9], "max_tokens": 1900, "n": 12, "stream": True,
                       "logprobs": 20, "temperature": 0.0, "ignore_eos": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert sock.recv(256).startswith(b"HTTP/1.1 200")
    return sock


def _metric(deployment: Deployment, name: str) -> float:
    with urllib.request.urlopen(f"http://{deployment.router.http_address}/metrics") as response:
        text = response.read().decode()
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name)]
    return sum(values)


def test_http_client_that_stops_reading_is_cut_off(deployment: Deployment) -> None:
    model = deployment.router.model.model_id
    sock = _stalled_stream(deployment.router.http_address, model)
    try:
        deadline = time.monotonic() + 60.0
        while _metric(deployment, "splitserve_slow_client_cutoffs_total") < 1:
            assert time.monotonic() < deadline, "the stalled client was never cut off"
            time.sleep(0.1)
        # Its decode request was aborted: every block back, none generating for nobody.
        state = deployment.wait_all_blocks_free(10.0)
        assert all(free == total for free, total in state.values()), state
        # The server dropped the connection: the bytes buffered before the cut, then the
        # end of the stream (recv times out instead if the server still holds it open).
        sock.settimeout(10.0)
        while sock.recv(65536):
            pass
    finally:
        sock.close()
    # And the service goes on serving.
    request = urllib.request.Request(
        f"http://{deployment.router.http_address}/v1/completions",
        data=json.dumps({"model": model, "prompt": [1, 2, 3], "max_tokens": 5,
                         "temperature": 0.0, "ignore_eos": True}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert json.loads(response.read())["usage"]["completion_tokens"] == 5
