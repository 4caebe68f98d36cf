"""A worker's gRPC server while its engine thread is busy or broken, over real gRPC:

- a caller that cancels its stream does not hold up the server's other calls (gRPC runs
  the cancel callback on the one thread that serves every call of the server: the abort it
  makes is posted to the engine loop, never waited for there);
- an engine whose step raised fails closed: its streams end UNAVAILABLE (the router then
  resumes them elsewhere), new work is refused, every service reports NOT_SERVING, and the
  worker leaves cluster state.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.cluster.memory import InMemoryClusterStore
from splitserve.common.convert.common import layout_to_proto, sampling_to_proto
from splitserve.common.sampling_params import SamplingParams
from splitserve.decode_worker.worker import DecodeWorker
from splitserve.engine.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine
from splitserve.prefill_worker.worker import PrefillWorker
from splitserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from splitserve.worker.runtime import WorkerOptions

NUM_BLOCKS = 64


@pytest.fixture
def pair(tiny_llama: Path) -> Iterator[tuple[PrefillWorker, DecodeWorker, InMemoryClusterStore]]:
    """A prefill and a decode worker (in-process KV; no router, so the decode worker's
    outputs go over its Admit streams: tests/service/test_engine_failure.py covers output
    channels)."""
    store = InMemoryClusterStore()
    engine = EngineConfig(model=str(tiny_llama), num_kv_blocks=NUM_BLOCKS, block_size=8,
                          max_num_batched_tokens=32)
    p = PrefillWorker(WorkerOptions(engine=engine, kv_backend="inproc", worker_id="p0"), store)
    d = DecodeWorker(WorkerOptions(engine=engine, kv_backend="inproc", worker_id="d0"), store)
    p.start()
    d.start()
    yield p, d, store
    p.stop()
    d.stop()


def _admit_local(stub: worker_pb2_grpc.DecodeWorkerStub, request_id: str,
                 max_tokens: int = 400) -> tuple[grpc.Future, worker_pb2.Admission]:
    stream = stub.Admit(worker_pb2.AdmitRequest(
        request_id=request_id, prompt_token_ids=list(range(40, 70)), prefill_locally=True,
        sampling_params=sampling_to_proto(SamplingParams(temperature=0.0,
                                                         max_tokens=max_tokens,
                                                         ignore_eos=True))))
    admission = next(stream).admission
    assert admission.accepted, admission.refusal_message
    return stream, admission


def _health(address: str, service: str = "", timeout_s: float = 2.0) -> int:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    return int(reply.status)


def _hold_loop(worker: DecodeWorker | PrefillWorker) -> threading.Event:
    """Keep the worker's engine thread in a command until the returned event is set."""
    running, release = threading.Event(), threading.Event()

    def wait(_engine: LLMEngine) -> None:
        running.set()
        release.wait(20)

    worker.loop.submit(wait)
    assert running.wait(10)
    return release


def _free_blocks(worker: DecodeWorker | PrefillWorker) -> int:
    return int(worker.loop.call(lambda e: e.block_manager.num_free_blocks))


def _wait_for(condition, timeout_s: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_cancelled_stream_does_not_hold_up_the_servers_other_calls(pair) -> None:  # type: ignore[no-untyped-def]
    _, d, _ = pair
    with grpc.insecure_channel(d.address) as channel:
        stub = worker_pb2_grpc.DecodeWorkerStub(channel)
        streams = [_admit_local(stub, f"c{i}")[0] for i in range(3)]
        release = _hold_loop(d)  # the engine thread is busy for as long as we like
        try:
            for stream in streams:
                stream.cancel()
            time.sleep(0.2)  # the server has seen the cancels and run their callbacks
            started = time.monotonic()
            assert _health(d.address, timeout_s=3.0) == health_pb2.HealthCheckResponse.SERVING
            assert time.monotonic() - started < 1.0
        finally:
            release.set()
    # The aborts ran once the engine thread was free: every block is back.
    assert _wait_for(lambda: _free_blocks(d) == NUM_BLOCKS)


def _fail_next_step(worker: DecodeWorker | PrefillWorker) -> None:
    def failing_step() -> list[object]:
        raise RuntimeError("injected: CUDA out of memory")

    worker.engine.step = failing_step  # type: ignore[method-assign]


def test_a_decode_engine_that_fails_ends_its_streams_unavailable(pair) -> None:  # type: ignore[no-untyped-def]
    p, d, store = pair
    with grpc.insecure_channel(d.address) as channel:
        stub = worker_pb2_grpc.DecodeWorkerStub(channel)
        running, _ = _admit_local(stub, "running")
        first = next(running)  # decoding
        assert first.output.token_ids
        # A remote prefill's reservation, waiting for its KV.
        waiting = stub.Admit(worker_pb2.AdmitRequest(
            request_id="waiting", prompt_token_ids=list(range(100, 120)),
            prefill_worker_id=p.worker_id, prefill_timeout_ms=60000,
            sampling_params=sampling_to_proto(SamplingParams(max_tokens=8))))
        assert next(waiting).admission.accepted
        _fail_next_step(d)
        for stream in (running, waiting):
            with pytest.raises(grpc.RpcError) as ended:
                for _ in stream:
                    pass
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "the engine of decode worker d0 failed" in ended.value.details()
            assert "injected: CUDA out of memory" in ended.value.details()
        assert d.failed.is_set()
        # New work is refused (the router tries another worker), the server still answers.
        refused = next(stub.Admit(worker_pb2.AdmitRequest(
            request_id="late", prompt_token_ids=[5, 6, 7], prefill_locally=True,
            sampling_params=sampling_to_proto(SamplingParams(max_tokens=4)))))
        assert not refused.admission.accepted
        assert refused.admission.refusal == worker_pb2.ADMIT_REFUSAL_DRAINING
        assert "d0 takes no more work: the engine failed" in refused.admission.refusal_message
    for service in ("", "splitserve.v1.DecodeWorker"):
        assert _health(d.address, service) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert _wait_for(lambda: "d0" not in {info.worker_id for info, _ in store.live_workers()})
    assert "p0" in {info.worker_id for info, _ in store.live_workers()}


def test_a_prefill_engine_that_fails_ends_its_prefills_unavailable(pair) -> None:  # type: ignore[no-untyped-def]
    p, d, store = pair
    prompt = list(range(200, 230))
    with grpc.insecure_channel(d.address) as dchannel, grpc.insecure_channel(p.address) as pchannel:
        dstub = worker_pb2_grpc.DecodeWorkerStub(dchannel)
        pstub = worker_pb2_grpc.PrefillWorkerStub(pchannel)
        admit = dstub.Admit(worker_pb2.AdmitRequest(
            request_id="r", prompt_token_ids=prompt, prefill_worker_id=p.worker_id,
            prefill_timeout_ms=60000, sampling_params=sampling_to_proto(
                SamplingParams(max_tokens=8))))
        admission = next(admit).admission
        assert admission.accepted
        release = _hold_loop(p)  # the prefill is queued behind this, then its step fails
        _fail_next_step(p)
        prefill = pstub.Prefill.future(worker_pb2.PrefillRequest(
            request_id="r", prompt_token_ids=prompt,
            sampling_params=sampling_to_proto(SamplingParams(max_tokens=8)),
            decode_worker_id=d.worker_id, decode_block_ids=admission.block_ids,
            kv_layout=layout_to_proto(p.layout)), timeout=30)
        time.sleep(0.3)  # the Prefill call has queued its command behind the held one
        release.set()
        with pytest.raises(grpc.RpcError) as failed:
            prefill.result(30)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "the engine of prefill worker p0 failed" in failed.value.details()
        with pytest.raises(grpc.RpcError) as refused:
            pstub.Prefill(worker_pb2.PrefillRequest(
                request_id="r2", prompt_token_ids=prompt,
                sampling_params=sampling_to_proto(SamplingParams(max_tokens=8)),
                decode_worker_id=d.worker_id, decode_block_ids=admission.block_ids,
                kv_layout=layout_to_proto(p.layout)), timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        # The router would now abort the request on the decode worker (and resume it).
        dstub.Abort(worker_pb2.DecodeAbortRequest(request_id="r"), timeout=10)
        list(admit)
    assert _health(p.address) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert _wait_for(lambda: "p0" not in {info.worker_id for info, _ in store.live_workers()})
    assert _wait_for(lambda: _free_blocks(d) == NUM_BLOCKS)  # the decode worker is unharmed
    assert not d.failed.is_set()


def test_the_worker_command_stops_waiting_once_its_engine_failed() -> None:
    """`splitserve prefill|decode` waits for a signal or its worker's `failed` (then exits
    non-zero so that its supervisor starts a fresh one)."""
    from splitserve.cli import _wait_for_signal

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        failed = threading.Event()
        threading.Timer(0.2, failed.set).start()
        assert _wait_for_signal(failed) is True
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
        assert _wait_for_signal(threading.Event()) is False
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def test_a_request_that_cannot_join_the_batch_ends_its_stream_and_frees_its_blocks(  # type: ignore[no-untyped-def]
        pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its KV arrived, but joining the running batch raised something other than a refusal
    (a bug, an allocation failure): the stream ends with the error, the blocks come back,
    and the worker goes on (before, the poller's exception was logged and the stream hung)."""
    p, d, _ = pair
    join = d.engine.add_prefilled_request

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("injected: cannot join")

    monkeypatch.setattr(d.engine, "add_prefilled_request", broken)
    prompt = list(range(400, 430))
    params = sampling_to_proto(SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    with grpc.insecure_channel(d.address) as dchannel, grpc.insecure_channel(p.address) as pchannel:
        dstub = worker_pb2_grpc.DecodeWorkerStub(dchannel)
        pstub = worker_pb2_grpc.PrefillWorkerStub(pchannel)
        admit = dstub.Admit(worker_pb2.AdmitRequest(
            request_id="r", prompt_token_ids=prompt, prefill_worker_id=p.worker_id,
            prefill_timeout_ms=60000, sampling_params=params))
        admission = next(admit).admission
        first = pstub.Prefill(worker_pb2.PrefillRequest(
            request_id="r", prompt_token_ids=prompt, sampling_params=params,
            decode_worker_id=d.worker_id, decode_block_ids=admission.block_ids,
            kv_layout=admission.kv_layout), timeout=30)
        dstub.PrefillDone(worker_pb2.PrefillDoneRequest(request_id="r",
                                                        first_token_id=first.first_token_id))
        [last] = [m for m in admit]
        assert last.output.finish_reason == common_pb2.FINISH_REASON_ERROR
        assert "injected: cannot join" in last.output.error_message
    assert _wait_for(lambda: _free_blocks(d) == NUM_BLOCKS)
    monkeypatch.setattr(d.engine, "add_prefilled_request", join)
    assert not d.failed.is_set()
