"""The router's own faults: killed, restarted, frozen.

Plain processes around a real redis-server holding the cluster state: a prefill and a
decode worker (each hosting its own KV store, lease 2 s) and routers that come and go.
Requests in flight on a router that dies end on the workers (its sockets close); on a
frozen router they end when its lease runs out (it stops answering HTTP/2 pings). Either
way every KV block comes back, and a new router serves as soon as it is up.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitserve.bench.procs import free_port
from splitserve.client import Client
from splitserve.cluster import open_store
from splitserve.common.sampling_params import SamplingParams
from splitserve.llm import LLM
from tests.conftest import start_redis_server
from tests.service.test_service_processes import ENGINE_ARGS, Proc, _decode_free_blocks, _spawn

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]

LEASE_S = 2.0
GREEDY = {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture
def workers(tiny_llama: Path, tmp_path: Path) -> Iterator[tuple[str, dict[str, Proc]]]:
    port = free_port()
    redis = start_redis_server(port, tmp_path)
    url = f"redis://127.0.0.1:{port}/0"
    common = ["--model", str(tiny_llama), "--cluster", url, "--kv-timeout", "5",
              "--heartbeat-ttl", "3", "--lease-timeout", str(LEASE_S), *ENGINE_ARGS]
    procs: dict[str, Proc] = {}
    try:
        procs["prefill"] = _spawn("prefill", *common, "--worker-id", "prefill-0")
        procs["decode"] = _spawn("decode", *common, "--worker-id", "decode-0")
        store = open_store(url)
        deadline = time.monotonic() + 30
        while len(store.live_workers()) < 2:
            assert time.monotonic() < deadline, "workers did not register"
            time.sleep(0.1)
        store.close()
        yield url, procs
    finally:
        for proc in procs.values():
            proc.stop()
        redis.kill()
        redis.wait(10)


def _router(tiny_llama: Path, redis_url: str) -> Proc:
    return _spawn("router", "--model", str(tiny_llama), "--port", "0", "--http-port", "0",
                  "--block-size", "8", "--local-prefill-threshold", "16",
                  "--redis-url", redis_url, "--max-resumes", "1")


def _long_streams(router: Proc, count: int) -> tuple[list[threading.Thread], list[str]]:
    """`count` streams that would run for minutes, half prefilled remotely; each thread
    records how its stream ended."""
    ends: list[str] = []

    def run(i: int) -> None:
        prompt = [200 + i + j for j in range(30 if i % 2 else 6)]
        try:
            with Client(router.fields[2], timeout=60, max_retries=0) as client:
                for chunk in client.stream(prompt, max_tokens=1500, temperature=0.0,
                                           ignore_eos=True):
                    if chunk.finish_reason:
                        ends.append(chunk.finish_reason)
                        return
        except Exception as exc:  # noqa: BLE001 - the SDK's error for a lost router
            ends.append(type(exc).__name__)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    return threads, ends


def _wait_blocks(address: str, busy: bool, limit_s: float) -> float:
    """Seconds until the decode worker holds blocks (busy) or holds none (not busy)."""
    start = time.monotonic()
    while True:
        free, total = _decode_free_blocks(address)
        if (free < total) == busy:
            return time.monotonic() - start
        assert time.monotonic() - start < limit_s, f"free {free}/{total} after {limit_s} s"
        time.sleep(0.05)


def _expected(tiny_llama: Path, prompts: list[list[int]]) -> list[list[int]]:
    llm = LLM(model=str(tiny_llama), num_kv_blocks=128, block_size=8)
    return [o.token_ids for o in llm.generate(prompts, SamplingParams(**GREEDY))]


def test_a_killed_router_frees_every_block_and_a_new_one_serves_at_once(
        workers: tuple[str, dict[str, Proc]], tiny_llama: Path) -> None:
    url, procs = workers
    decode = procs["decode"].fields[3]
    old = _router(tiny_llama, url)
    try:
        threads, ends = _long_streams(old, 6)
        _wait_blocks(decode, busy=True, limit_s=30)
        time.sleep(0.5)  # streams mid-decode
        old.popen.kill()
        old.popen.wait(10)
        freed_s = _wait_blocks(decode, busy=False, limit_s=5)
        for t in threads:
            t.join(30)
        assert len(ends) == 6 and "length" not in ends, ends  # none finished, none hung
    finally:
        old.stop()
    print(f"blocks back {freed_s * 1000:.0f} ms after the router's SIGKILL")
    prompts = [[5, 6, 7], [300 + i for i in range(40)]]  # local and remote prefill
    new = _router(tiny_llama, url)  # the workers are in Redis: nothing to wait for
    try:
        with Client(new.fields[2], timeout=60, max_retries=0) as client:
            got = [client.generate(p, **GREEDY) for p in prompts]
        assert [c.token_ids for c in got] == _expected(tiny_llama, prompts)
        assert got[1].timings is not None and got[1].timings.prefill_worker_id == "prefill-0"
    finally:
        new.stop()
    _wait_blocks(decode, busy=False, limit_s=5)


def test_a_frozen_routers_reservations_expire_with_its_lease(
        workers: tuple[str, dict[str, Proc]], tiny_llama: Path) -> None:
    url, procs = workers
    decode = procs["decode"].fields[3]
    router = _router(tiny_llama, url)
    try:
        threads, ends = _long_streams(router, 6)
        _wait_blocks(decode, busy=True, limit_s=30)
        router.popen.send_signal(signal.SIGSTOP)  # its sockets stay open, it answers nothing
        try:
            freed_s = _wait_blocks(decode, busy=False, limit_s=LEASE_S + 6)
        finally:
            router.popen.send_signal(signal.SIGCONT)
        print(f"blocks back {freed_s:.1f} s after the router froze (lease {LEASE_S} s)")
        for t in threads:
            t.join(90)
        # Thawed, the router finds its streams cut and resumes them (on the same worker:
        # it is the only one, and never are all workers ejected): each ends, none hangs.
        assert len(ends) == 6, ends
        # ...and it serves new requests too.
        with Client(router.fields[2], timeout=60, max_retries=0) as client:
            out = client.generate([9, 10, 11], **GREEDY)
        assert out.token_ids == _expected(tiny_llama, [[9, 10, 11]])[0]
    finally:
        router.stop()
    _wait_blocks(decode, busy=False, limit_s=5)
