"""Token-level resume: a decode worker killed with SIGKILL mid-stream loses no request.

Plain processes (router, one prefill worker, two decode workers; each worker hosts its own
KV rendezvous store, so the killed worker takes no other pair's store with it).
Streams running on the killed worker continue on the other one from the last token the
client received: greedy and seeded outputs equal the colocated engine's, usage counts
every token once, and the surviving worker ends with every block free.
"""

from __future__ import annotations

import random
import re
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from splitserve.client import Client
from splitserve.common.sampling_params import SamplingParams
from splitserve.llm import LLM
from tests.service.test_service_processes import (
    ENGINE_ARGS,
    Proc,
    _decode_free_blocks,
    _spawn,
    _wait_live,
)

MAX_TOKENS = 120

pytestmark = pytest.mark.chaos


@pytest.fixture
def cluster(tiny_llama: Path) -> Iterator[dict[str, Proc]]:
    router = _spawn("router", "--model", str(tiny_llama), "--port", "0", "--http-port", "0",
                    "--block-size", "8", "--local-prefill-threshold", "16",
                    "--prefill-timeout-ms", "5000", "--max-resumes", "2")
    common = ["--model", str(tiny_llama), "--cluster", router.fields[4],
              "--kv-timeout", "5", "--heartbeat-ttl", "3", *ENGINE_ARGS]
    procs = {"router": router}
    try:
        procs["prefill"] = _spawn("prefill", *common)
        procs["decode-a"] = _spawn("decode", *common, "--worker-id", "decode-a")
        procs["decode-b"] = _spawn("decode", *common, "--worker-id", "decode-b")
        _wait_live(router.fields[2], 3)
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


def _requests() -> list[tuple[list[int], dict[str, object]]]:
    rng = random.Random(21)
    out = []
    for i in range(12):
        prompt = [rng.randrange(100, 40000) for _ in range(rng.choice([5, 30, 70]))]
        sampling: dict[str, object] = {"max_tokens": MAX_TOKENS, "ignore_eos": True}
        if i % 3 == 2:  # seeded sampling continues from the same draw
            sampling.update(temperature=0.9, top_k=50, seed=1000 + i)
        else:
            sampling.update(temperature=0.0)
        out.append((prompt, sampling))
    return out


def _run_streams(cluster: dict[str, Proc], tiny_llama: Path, signum: int
                 ) -> tuple[list[list[int]], list[tuple[list[int], int, str, str, float, int]]]:
    """The requests as concurrent streams; `signum` goes to decode-a once every stream has
    8 tokens. Returns the colocated engine's outputs and, per stream: tokens, completion
    tokens in usage, finish reason, the decode worker that finished it, the longest gap
    between two chunks (s), the times it resumed."""
    requests = _requests()
    llm = LLM(model=str(tiny_llama), num_kv_blocks=256, block_size=8)
    expected = [llm.generate([p], SamplingParams(**s))[0].token_ids for p, s in requests]
    streamed = [0] * len(requests)
    ready = threading.Event()

    def run(i: int) -> tuple[list[int], int, str, str, float, int]:
        prompt, sampling = requests[i]
        tokens: list[int] = []
        last, gap = None, 0.0
        with Client(cluster["router"].fields[2], timeout=120, max_retries=0) as client:
            for chunk in client.stream(prompt, **sampling):
                now = time.monotonic()
                if last is not None and ready.is_set():
                    gap = max(gap, now - last)
                last = now
                tokens.extend(chunk.token_ids)
                streamed[i] = len(tokens)
                if all(n >= 8 for n in streamed):
                    ready.set()
                if chunk.finish_reason:
                    assert chunk.usage is not None and chunk.timings is not None
                    reason = chunk.finish_reason
                    if reason == "error":  # (the message, for the assertion)
                        reason += ": " + chunk.error_message
                    return (tokens, chunk.usage.completion_tokens, reason,
                            chunk.timings.decode_worker_id, gap, chunk.timings.num_resumes)
        raise AssertionError("stream ended without a finish reason")

    with ThreadPoolExecutor(len(requests)) as pool:
        futures = [pool.submit(run, i) for i in range(len(requests))]
        assert ready.wait(60), f"streams did not start: {streamed}"
        cluster["decode-a"].popen.send_signal(signum)
        at_signal = list(streamed)
        results = [f.result(120) for f in futures]
    # Most streams were cut mid-way (one that started early may have finished).
    assert sum(n < MAX_TOKENS for n in at_signal) >= len(at_signal) // 2, at_signal
    return expected, results


def _check_exact(expected: list[list[int]],
                 results: list[tuple[list[int], int, str, str, float, int]]) -> None:
    requests = _requests()
    for i, (tokens, completion_tokens, reason, decode_id, _gap, resumes) in enumerate(results):
        assert reason == "length", (i, reason)
        assert tokens == expected[i], f"request {i}: {requests[i][1]}"
        assert completion_tokens == MAX_TOKENS
        if resumes:  # (a stream may have finished on decode-a before the signal)
            assert decode_id == "decode-b", (i, decode_id)
    # (Should this fail, the decode worker that finished each stream says whether any ran
    # on the signalled worker at all.)
    assert any(r[5] for r in results), f"no stream resumed: {[r[3] for r in results]}"


def _resumes(cluster: dict[str, Proc], reason: str) -> int:
    metrics = urllib.request.urlopen(f"http://{cluster['router'].fields[6]}/metrics").read()
    pattern = rb'splitserve_request_resumes_total\{reason="%s"\} (\d+)' % reason.encode()
    found = re.search(pattern, metrics)
    assert found, metrics
    return int(found.group(1))


def _survivor_idle(cluster: dict[str, Proc]) -> None:
    survivor = cluster["decode-b"].fields[3]
    deadline = time.monotonic() + 5
    while (state := _decode_free_blocks(survivor))[0] != state[1]:
        assert time.monotonic() < deadline, f"decode-b holds blocks: {state}"
        time.sleep(0.1)


def test_decode_worker_killed_mid_stream_loses_nothing(cluster: dict[str, Proc],
                                                      tiny_llama: Path) -> None:
    expected, results = _run_streams(cluster, tiny_llama, signal.SIGKILL)
    _check_exact(expected, results)
    assert _resumes(cluster, "decode_lost") >= 1
    _survivor_idle(cluster)
    # New requests keep working with one decode worker, remote prefill included: the dead
    # worker's KV store was only its own.
    with Client(cluster["router"].fields[2], timeout=60, max_retries=0) as client:
        out = client.generate([7, 8, 9, 10], max_tokens=5, temperature=0.0, ignore_eos=True)
        assert out.finish_reason == "length"
        for n in range(4):
            long = client.generate([100 + n + i for i in range(40)], max_tokens=5,
                                   temperature=0.0, ignore_eos=True)
            assert long.finish_reason == "length"
            assert long.timings is not None
            assert long.timings.prefill_worker_id == cluster["prefill"].fields[2], long.timings


def test_sigterm_migrates_a_decode_workers_streams(cluster: dict[str, Proc],
                                                  tiny_llama: Path) -> None:
    """Graceful drain with live migration: the draining worker hands its streams back
    keeping their KV, the router admits each continuation on the other worker and the
    draining one ships the KV there (nothing recomputed); it exits long before the streams
    would have ended."""
    started = time.monotonic()
    expected, results = _run_streams(cluster, tiny_llama, signal.SIGTERM)
    _check_exact(expected, results)
    migrated, drained = _resumes(cluster, "decode_migrated"), _resumes(cluster, "decode_drained")
    lost = _resumes(cluster, "decode_lost")
    assert migrated >= 1 and lost == 0, (migrated, drained, lost)
    assert cluster["decode-a"].popen.wait(30) == 0
    _survivor_idle(cluster)
    pause = max(r[4] for r in results)
    print(f"longest pause of a migrated stream: {pause * 1000:.0f} ms ({migrated} KV shipped, "
          f"{drained} recomputed; run took {time.monotonic() - started:.1f} s)")


def test_a_frozen_decode_worker_is_detected_and_its_streams_resume(
        cluster: dict[str, Proc], tiny_llama: Path) -> None:
    """SIGSTOP: no socket closes, so only the router's keepalive pings find out; the
    streams resume on the other worker, and the frozen one frees everything once it
    continues (its streams were cancelled)."""
    frozen = cluster["decode-a"]
    try:
        expected, results = _run_streams(cluster, tiny_llama, signal.SIGSTOP)
        print(f"longest pause of a resumed stream: {max(r[4] for r in results):.2f} s")
        _check_exact(expected, results)
        assert _resumes(cluster, "decode_lost") >= 1
    finally:
        frozen.popen.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 10
    while (state := _decode_free_blocks(frozen.fields[3]))[0] != state[1]:
        assert time.monotonic() < deadline, f"the thawed worker holds blocks: {state}"
        time.sleep(0.1)
    _survivor_idle(cluster)
