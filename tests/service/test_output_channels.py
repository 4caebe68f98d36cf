"""Output channels (decode_worker.output_channel, router.output_channel): a decode worker's
outputs over one TCP connection per router, written by its engine thread, instead of one
Admit stream message per output.

In-process deployments (the real router and decode worker, real gRPC and TCP on
127.0.0.1, the tiny random-weight model):
- the router opens a worker's channel when it finds the worker in cluster state (its
  registration names the endpoint), and a request to it waits for the channel to open:
  the router's very first request goes over the channel,
  with the same tokens, logprobs, usage and finish reason as over the Admit stream (a
  router with output_channels=False), and the decode worker's timings;
- a channel that closes mid-stream (from the worker's side) ends its requests there and the
  router resumes them: the client gets every token once, the same tokens, and every block
  is free afterwards; later requests stream again (over the Admit stream, then a new
  channel);
- a client that cancels a request streaming over the channel frees its blocks;
- the router's output_channels=False keeps every request on its Admit stream.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from splitserve.client import Client
from splitserve.common.sampling_params import SamplingParams
from splitserve.llm import LLM
from splitserve.router import output_channel as router_output_channel
from tests.service.deployment import Deployment, start_deployment

PROMPT = [11, 22, 33, 44, 55, 66, 77]


def _deployment(tiny_llama: Path, **router: Any) -> Deployment:
    return start_deployment(str(tiny_llama), 0, 1,
                            engine={"num_kv_blocks": 128, "block_size": 8},
                            router={"local_prefill_threshold": 4096, "max_resumes": 2,
                                    **router})


@pytest.fixture()
def deployment(tiny_llama: Path) -> Iterator[Deployment]:
    d = _deployment(tiny_llama)
    yield d
    d.stop()


def _stream(d: Deployment, prompt: list[int], **sampling: Any) -> dict[str, Any]:
    tokens: list[int] = []
    logprobs: list[Any] = []
    with Client(d.address, timeout=60, max_retries=0) as client:
        for chunk in client.stream(prompt, **sampling):
            tokens.extend(chunk.token_ids)
            logprobs.extend(chunk.logprobs or [])
            if chunk.finish_reason:
                return {"tokens": tokens, "logprobs": logprobs, "reason": chunk.finish_reason,
                        "usage": chunk.usage, "timings": chunk.timings}
    raise AssertionError("the stream ended without a finish reason")


def _wait_channel(d: Deployment, timeout_s: float = 10.0) -> None:
    channels = d.decode[0].output_channels
    assert channels is not None
    deadline = time.monotonic() + timeout_s
    while channels.num_open < 1:
        assert time.monotonic() < deadline, "the router opened no output channel"
        time.sleep(0.02)
    time.sleep(0.1)  # (the router marks it ready once its hello is written)


def test_requests_go_over_the_channel_opened_at_discovery_with_the_same_outputs(
        tiny_llama: Path, deployment: Deployment, monkeypatch: pytest.MonkeyPatch) -> None:
    # The first request waits for the channel the router opens when it finds the worker;
    # on a busy machine the worker's acknowledgement may take longer than OPEN_WAIT_S.
    monkeypatch.setattr(router_output_channel, "OPEN_WAIT_S", 10.0)
    worker = deployment.decode[0]
    assert worker.output_endpoint and worker.output_channels is not None
    sampling = {"max_tokens": 24, "temperature": 0.0, "ignore_eos": True, "logprobs": 2}
    again = _stream(deployment, PROMPT, **sampling)  # the router's first request
    assert worker.num_channel_streams == 1
    assert worker.metrics_snapshot().output_channel_streams == 1  # (its Prometheus counter)
    reference = _deployment(tiny_llama, output_channels=False)
    try:
        first = _stream(reference, PROMPT, **sampling)  # over the Admit stream
        assert reference.decode[0].num_channel_streams == 0
    finally:
        reference.stop()
    assert again["tokens"] == first["tokens"] and len(again["tokens"]) == 24
    assert again["reason"] == first["reason"] == "length"
    assert [(lp.token_id, round(lp.logprob, 5)) for lp in again["logprobs"]] == [
        (lp.token_id, round(lp.logprob, 5)) for lp in first["logprobs"]]
    assert again["usage"].completion_tokens == 24
    assert again["timings"].decode_worker_id == worker.worker_id
    assert again["timings"].e2e_ms > 0
    assert deployment.wait_all_blocks_free(5.0)["decode-0"][0] == 128


def test_a_channel_closed_mid_stream_resumes_its_requests(
        tiny_llama: Path, deployment: Deployment, caplog: pytest.LogCaptureFixture) -> None:
    worker = deployment.decode[0]
    sampling = {"max_tokens": 300, "temperature": 0.0, "ignore_eos": True}
    expected = LLM(model=str(tiny_llama), num_kv_blocks=128, block_size=8).generate(
        [PROMPT], SamplingParams(**sampling))[0].token_ids
    _stream(deployment, [5, 6, 7], max_tokens=2)  # the router finds the worker
    _wait_channel(deployment)
    channels = worker.output_channels
    assert channels is not None
    got: list[int] = []
    resumes = []
    with Client(deployment.address, timeout=60, max_retries=0) as client:
        for chunk in client.stream(PROMPT, **sampling):
            got.extend(chunk.token_ids)
            if got and channels.num_open:  # at the first chunk: long before the last token
                channels.close_channels("closed by the test")
            if chunk.finish_reason:
                assert chunk.finish_reason == "length", chunk.error_message
                resumes.append(chunk.timings.num_resumes)
    assert worker.num_channel_streams >= 1
    assert resumes == [1]
    assert got == expected  # every token once, the same as uninterrupted
    # A lost channel says nothing of its worker: it was not left out (ejected).
    assert not [r for r in caplog.records if "left out for" in r.getMessage()]
    state = deployment.wait_all_blocks_free(10.0)
    assert state["decode-0"][0] == state["decode-0"][1], state
    assert _stream(deployment, PROMPT, max_tokens=8, temperature=0.0,
                   ignore_eos=True)["tokens"] == expected[:8]


def test_a_channel_lost_with_its_worker_ejects_the_worker(
        tiny_llama: Path, deployment: Deployment, caplog: pytest.LogCaptureFixture) -> None:
    """A worker that dies closes its channel, and the router may read that before its Admit
    streams' errors: it asks the worker's health, and one that does not answer SERVING is
    left out like a worker whose stream broke (here: the worker reports NOT_SERVING, then
    its channel closes; it is the only decode worker, so the resume still lands on it)."""
    worker = deployment.decode[0]
    sampling = {"max_tokens": 300, "temperature": 0.0, "ignore_eos": True}
    expected = LLM(model=str(tiny_llama), num_kv_blocks=128, block_size=8).generate(
        [PROMPT], SamplingParams(**sampling))[0].token_ids
    _stream(deployment, [5, 6, 7], max_tokens=2)
    _wait_channel(deployment)
    channels, health = worker.output_channels, worker.health
    assert channels is not None and health is not None
    got: list[int] = []
    with Client(deployment.address, timeout=60, max_retries=0) as client:
        for chunk in client.stream(PROMPT, **sampling):
            got.extend(chunk.token_ids)
            if got and channels.num_open:
                health.set_not_serving()
                channels.close_channels("closed by the test")
            if chunk.finish_reason:
                assert chunk.finish_reason == "length", chunk.error_message
                assert chunk.timings.num_resumes == 1
    assert got == expected
    ejected = [r.getMessage() for r in caplog.records if "left out for" in r.getMessage()]
    assert ejected and "does not answer its health check as serving" in ejected[0], ejected


def test_a_cancelled_request_over_the_channel_frees_its_blocks(
        deployment: Deployment) -> None:
    worker = deployment.decode[0]
    _stream(deployment, [5, 6, 7], max_tokens=2)
    _wait_channel(deployment)
    seen = threading.Event()
    with Client(deployment.address, timeout=60, max_retries=0) as client:
        stream = client.stream(PROMPT, max_tokens=400, temperature=0.0, ignore_eos=True)
        for n, _chunk in enumerate(stream):
            if n == 5:
                seen.set()
                break
        stream.close()  # cancels the Generate call
    assert seen.is_set() and worker.num_channel_streams == 2
    state = deployment.wait_all_blocks_free(10.0)
    assert state["decode-0"][0] == state["decode-0"][1], state


def test_the_router_can_keep_every_request_on_its_admit_stream(tiny_llama: Path) -> None:
    d = _deployment(tiny_llama, output_channels=False)
    try:
        for _ in range(3):
            assert len(_stream(d, PROMPT, max_tokens=6, temperature=0.0)["tokens"]) > 0
        channels = d.decode[0].output_channels
        assert channels is not None and channels.num_open == 0
        assert d.decode[0].num_channel_streams == 0
    finally:
        d.stop()
