"""The disaggregated service end to end: router + prefill + decode workers in this process,
real gRPC over loopback, real gloo KV transfer; greedy tokens equal the colocated LLM."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from splitserve.client import Client, Overloaded
from splitserve.common.sampling_params import SamplingParams
from splitserve.llm import LLM
from tests.service.deployment import Deployment, start_deployment

ENGINE = {"num_kv_blocks": 256, "block_size": 8, "max_num_batched_tokens": 256}


def _prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(rng.choice([3, 20, 45, 90, 130]))]
            for _ in range(count)]


@pytest.fixture(scope="module")
def expected(tiny_llama: Path) -> dict[int, list[int]]:
    prompts = _prompts(32)
    llm = LLM(model=str(tiny_llama), **ENGINE)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    return {i: o.token_ids for i, o in enumerate(outs)}


# The prefill workers' KV over gloo: "auto" sends this tiny model's prompts whole (one
# message after the last layer), "layer" a message per layer as each is computed.
@pytest.fixture(scope="module", params=["auto", "layer"])
def deployment(request: pytest.FixtureRequest, tiny_llama: Path) -> Iterator[Deployment]:
    # (heartbeats may wait seconds for the GIL of a process running four engines, a router
    # and 32 clients on a loaded 2-core machine: a worker that lapsed out of the store for a
    # moment would take no share of a burst)
    d = start_deployment(str(tiny_llama), 2, 2, engine=ENGINE,
                         router={"local_prefill_threshold": 8},
                         worker_options={"kv_send": request.param}, heartbeat_ttl_s=10.0)
    yield d
    d.stop()


def _generate(address: str, prompt: list[int]) -> list[int]:
    with Client(address, timeout=60) as client:
        return client.generate(prompt, max_tokens=16, temperature=0.0, ignore_eos=True).token_ids


def test_32_concurrent_requests_equal_colocated(deployment: Deployment, expected) -> None:  # type: ignore[no-untyped-def]
    prompts = _prompts(32)
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda p: _generate(deployment.address, p), prompts))
    for i, tokens in enumerate(results):
        assert tokens == expected[i], f"prompt {i} (len {len(prompts[i])})"
    state = deployment.wait_all_blocks_free()
    assert all(free == total for free, total in state.values()), state
    used = [w.kv.stats().bytes_sent for w in deployment.prefill]
    assert all(b > 0 for b in used), f"both prefill workers should have sent KV: {used}"
    # A burst spreads over the decode workers (each request counts on its worker from the
    # moment it is sent there, not from the worker's next load report).
    served = [sum(w.loop.finished_counts().values()) for w in deployment.decode]
    assert min(served) >= 8, served


def test_cancel_mid_stream_frees_blocks(deployment: Deployment) -> None:
    with Client(deployment.address, timeout=60) as client:
        stream = client.stream(_prompts(1, seed=5)[0], max_tokens=1500, temperature=0.0,
                               ignore_eos=True)
        for n, _chunk in enumerate(stream):
            if n == 3:
                break
        stream.close()
    state = deployment.wait_all_blocks_free()
    assert all(free == total for free, total in state.values()), state


def test_local_prefill_and_no_prefill_worker_give_same_tokens(tiny_llama: Path, expected) -> None:  # type: ignore[no-untyped-def]
    prompts = _prompts(32)[:6]
    for router_opts, num_prefill in (({"local_prefill_threshold": 10_000}, 1), ({}, 0)):
        d = start_deployment(str(tiny_llama), num_prefill, 1, engine=ENGINE, router=router_opts)
        try:
            for i, prompt in enumerate(prompts):
                assert _generate(d.address, prompt) == expected[i]
            if num_prefill:
                assert d.prefill[0].kv.stats().bytes_sent == 0  # everything prefilled on D
        finally:
            d.stop()


def test_a_short_prompt_is_not_sent_behind_a_long_local_prefill(tiny_llama: Path) -> None:
    """Two colocated workers (no prefill worker). decode-0 is part way through a 1,500-token
    prompt in 4-token chunks; decode-1 decodes two short streams. A third short prompt goes
    to decode-1, the busier one: on decode-0 it would wait for the whole long prefill
    (router.policy.QUEUED_TOKENS_PER_RANK; the router counts the long prompt's tokens from
    the moment it sends it, and the worker reports its chunked prefill's remaining ones)."""
    d = start_deployment(str(tiny_llama), 0, 2, engine={**ENGINE, "max_num_batched_tokens": 4})
    try:
        def queued(i: int) -> int:  # prompt tokens decode-i has still to compute
            return d.decode[i].loop.call(lambda e: sum(
                s.num_uncomputed_tokens for s in [*e.scheduler.waiting, *e.scheduler.running]
                if s.is_prefilling))

        def running(i: int) -> int:
            return d.decode[i].loop.call(lambda e: e.scheduler.num_running)

        with Client(d.address, timeout=60) as long_client, Client(d.address, timeout=60) as client:
            long_prompt = [random.Random(7).randrange(100, 40000) for _ in range(1500)]
            done: list[list[int]] = []
            thread = threading.Thread(target=lambda: done.append(long_client.generate(
                long_prompt, max_tokens=2, temperature=0.0, ignore_eos=True).token_ids))
            thread.start()
            deadline = time.monotonic() + 30
            while queued(0) < 1000:  # decode-0 (first by id) took it and is prefilling it
                assert time.monotonic() < deadline, "the long prompt never queued on decode-0"
                time.sleep(0.005)
            streams = []
            for i in range(3):
                stream = client.stream([11 + i, 12, 13, 14, 15], max_tokens=200,
                                       temperature=0.0, ignore_eos=True)
                next(iter(stream))  # admitted, first token out
                streams.append(stream)
            still_prefilling = queued(0)
            placed = (running(0), running(1))
            for stream in streams:
                stream.close()
            thread.join(60)
        assert placed == (1, 3), f"running on (decode-0, decode-1): {placed}"
        assert still_prefilling > 0, "the long prefill ended before the short ones were placed"
        assert len(done) == 1 and len(done[0]) == 2
        state = d.wait_all_blocks_free()
        assert all(free == total for free, total in state.values()), state
    finally:
        d.stop()


def test_a_load_report_is_dated_when_the_engine_took_it(tiny_llama: Path) -> None:
    """While the engine thread is busy (a long step; here a command that sleeps), the
    worker's heartbeats carry its last snapshot dated when it was taken, so the router keeps
    counting the requests it sent since (router.worker_index.build_view)."""
    d = start_deployment(str(tiny_llama), 0, 1, engine=ENGINE)
    try:
        worker = d.decode[0]
        holding = threading.Event()

        def hold(_engine: object) -> None:
            holding.set()
            time.sleep(0.6)

        thread = threading.Thread(target=lambda: worker.loop.call(hold))
        thread.start()
        assert holding.wait(10)
        held_from = time.time()
        time.sleep(0.3)
        stale = worker.load_report()
        thread.join(10)
        time.sleep(0.1)
        fresh = worker.load_report()
        assert stale.updated_at <= held_from < fresh.updated_at <= time.time()
    finally:
        d.stop()


def test_a_remote_prefill_counts_from_when_the_prefill_worker_queued_it(
        tiny_llama: Path) -> None:
    """The router counts a prompt sent to a prefill worker until a load report that worker
    took after it queued the prompt, not merely after the router sent it: the worker says
    so in the Prefill call's initial metadata (grpc_util.PREFILL_ADMITTED). Here the prefill
    worker's engine thread is held when the prompt arrives, so it queues the prompt
    only once the hold ends; the router's count for it must start no earlier."""
    d = start_deployment(str(tiny_llama), 1, 1,
                         engine={**ENGINE, "max_num_batched_tokens": 4},
                         router={"local_prefill_threshold": 1})
    try:
        prefill = d.prefill[0]
        state = d.router._router._state
        assert state is not None
        holding, released_at = threading.Event(), []

        def hold(_engine: object) -> None:
            holding.set()
            time.sleep(0.5)
            released_at.append(time.time())

        holder = threading.Thread(target=lambda: prefill.loop.call(hold))
        holder.start()
        assert holding.wait(10)
        done: list[list[int]] = []
        long_prompt = [random.Random(3).randrange(100, 40000) for _ in range(1500)]
        with Client(d.address, timeout=60) as client:
            thread = threading.Thread(target=lambda: done.append(client.generate(
                long_prompt, max_tokens=2, temperature=0.0, ignore_eos=True).token_ids))
            thread.start()
            holder.join(10)
            counted_from = None
            deadline = time.monotonic() + 30
            while counted_from is None or counted_from < released_at[0]:
                assert time.monotonic() < deadline and thread.is_alive(), (
                    f"never counted from the moment it was queued ({counted_from} < "
                    f"{released_at})")
                pending = list(state.directory._pending.get("prefill-0", []))
                counted_from = max((a.started_at for a in pending), default=None)
                time.sleep(0.002)
            thread.join(60)
        assert len(done) == 1 and len(done[0]) == 2
        state_after = d.wait_all_blocks_free()
        assert all(free == total for free, total in state_after.values()), state_after
    finally:
        d.stop()


def test_over_capacity_is_resource_exhausted(tiny_llama: Path) -> None:
    d = start_deployment(str(tiny_llama), 1, 1, engine=ENGINE,
                         router={"max_inflight": 1, "max_queued": 0})
    try:
        release = threading.Event()
        with Client(d.address, timeout=60) as client:
            stream = client.stream(_prompts(1)[0], max_tokens=1500, temperature=0.0,
                                   ignore_eos=True)
            next(iter(stream))  # the one slot is now taken
            with pytest.raises(Overloaded) as info:
                client.generate([1, 2, 3], max_tokens=4, timeout=10)
            assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            stream.close()
            release.set()
    finally:
        d.stop()


def test_generate_command_streams_an_answer(deployment: Deployment,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from splitserve.cli import main

    code = main(["generate", "Once upon a time", "--address", deployment.address,
                 "--max-tokens", "12", "--temperature", "0"])
    captured = capsys.readouterr()
    assert code == 0
    assert captured.out.strip(), "the answer goes to stdout"
    assert "TTFT" in captured.err and "TPOT" in captured.err
