"""Paced streams end to end (router + prefill + decode workers in this process, real gRPC):
the client receives one token per chunk, no faster than the pace, token-identical to an
unpaced run, over gRPC and the HTTP API, through a remote and a local prefill; unpaced
requests beside it are not held back; the decode worker counts what it paced."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from splitserve.client import Client
from tests.service.deployment import Deployment, start_deployment

ENGINE = {"num_kv_blocks": 128, "block_size": 8, "max_num_batched_tokens": 128,
          "stream_pace_buffer_s": 0.2}
RATE = 20.0
N = 16
SHORT = [5, 6, 7]  # prefilled on the decode worker (local_prefill_threshold 8)
LONG = list(range(300, 320))  # prefilled on the prefill worker


@pytest.fixture(scope="module")
def deployment(tiny_llama: Path) -> Iterator[Deployment]:
    d = start_deployment(str(tiny_llama), 1, 1, engine=ENGINE,
                         router={"local_prefill_threshold": 8, "http_port": 0})
    yield d
    d.stop()


def _stream(address: str, prompt: list[int], **kwargs: object
            ) -> tuple[list[int], list[float], list[int]]:
    """(tokens, arrival time of each chunk with tokens, tokens per chunk)."""
    tokens: list[int] = []
    times: list[float] = []
    sizes: list[int] = []
    with Client(address, timeout=60) as client:
        for chunk in client.stream(prompt, max_tokens=N, temperature=0.0, ignore_eos=True,
                                   **kwargs):
            if chunk.token_ids:
                times.append(time.monotonic())
                sizes.append(len(chunk.token_ids))
                tokens += chunk.token_ids
    return tokens, times, sizes


def _assert_paced(times: list[float], rate: float) -> None:
    """No faster than the pace (a generous 20% slack for the client's own scheduling), and
    not absurdly slower (a sanity bound, not a timing target)."""
    span = times[-1] - times[0]
    assert span >= 0.8 * (len(times) - 1) / rate, span
    assert span < 20 * (len(times) - 1) / rate, span


@pytest.mark.parametrize("prompt", [SHORT, LONG], ids=["local-prefill", "remote-prefill"])
def test_a_paced_stream_arrives_token_by_token_at_its_pace(deployment: Deployment,
                                                           prompt: list[int]) -> None:
    plain, _, _ = _stream(deployment.address, prompt)
    with ThreadPoolExecutor(2) as pool:
        paced_job = pool.submit(_stream, deployment.address, prompt, stream_pace=RATE)
        time.sleep(0.05)
        beside = pool.submit(_stream, deployment.address, [9, 10, 11, 12])
        paced, times, sizes = paced_job.result()
        _, beside_times, _ = beside.result()
    assert paced == plain and len(paced) == N
    assert sizes == [1] * N
    _assert_paced(times, RATE)
    assert beside_times[-1] < times[-1]  # the unpaced request was not held to the pace
    worker = deployment.decode[0]
    assert worker.loop.num_paced_requests >= 1
    assert worker.loop.num_paced_sit_outs > 0  # it ran ahead and then sat out
    state = deployment.wait_all_blocks_free()
    assert all(free == total for free, total in state.values()), state


def test_http_stream_follows_a_named_pace_and_refuses_bad_ones(deployment: Deployment) -> None:
    url = f"http://{deployment.router.http_address}/v1/completions"
    body = {"prompt": SHORT, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_pace": "skimming"}
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    times = []
    with urllib.request.urlopen(request, timeout=60) as response:
        for line in response:
            if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["text"]:
                times.append(time.monotonic())
    assert len(times) >= 4  # tiny-model tokens may decode to no text now and then
    _assert_paced(times, 10.0)
    for bad, message in ((dict(body, stream_pace="sprint"), "stream_pace"),
                         (dict(body, stream_pace=-2), "stream_pace"),
                         (dict(body, stream=False), "stream=true")):
        request = urllib.request.Request(url, json.dumps(bad).encode(),
                                         {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=60)
        assert info.value.code == 400
        error = json.loads(info.value.read())["error"]
        assert message in error["message"] and error["param"] == "stream_pace"
