"""The components as plain processes (`splitserve router|decode|prefill`), as Kubernetes and
fault tests run them: they find each other through the router's embedded cluster store."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from splitserve.bench.procs import free_port, spawn
from splitserve.client import Client
from splitserve.common.sampling_params import SamplingParams
from splitserve.llm import LLM
from splitserve.v1 import worker_pb2, worker_pb2_grpc

ENGINE_ARGS = ["--num-kv-blocks", "128", "--block-size", "8", "--threads", "1"]
GREEDY = {"max_tokens": 10, "temperature": 0.0, "ignore_eos": True}


@dataclass
class Proc:
    popen: subprocess.Popen[str]
    fields: list[str]  # the READY line's words

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def _spawn(*args: str, timeout_s: float = 120.0) -> Proc:
    return Proc(*spawn(list(args), timeout_s))


@pytest.fixture(scope="module")
def cluster(tiny_llama: Path) -> Iterator[dict[str, Proc]]:
    router = _spawn("router", "--model", str(tiny_llama), "--port", "0", "--http-port", "0",
                    "--block-size", "8",
                    "--local-prefill-threshold", "4", "--prefill-timeout-ms", "3000")
    cluster_url = router.fields[4]
    kv_store = f"127.0.0.1:{free_port()}"
    common = ["--model", str(tiny_llama), "--cluster", cluster_url, "--kv-store", kv_store,
              "--kv-timeout", "3", "--heartbeat-ttl", "3", *ENGINE_ARGS]
    procs = {"router": router}
    try:
        procs["decode"] = _spawn("decode", *common, "--serve-kv-store")
        procs["prefill"] = _spawn("prefill", *common)
        _wait_live(router.fields[2], 2)
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


def _wait_live(router_address: str, count: int) -> None:
    from splitserve.cluster.remote import RemoteClusterStore
    from splitserve.common import envs

    store = RemoteClusterStore(router_address,
                               token=envs.cluster_token())
    deadline = time.monotonic() + 30
    while len(store.live_workers()) < count:
        assert time.monotonic() < deadline, "workers did not register"
        time.sleep(0.1)
    store.close()


def _decode_free_blocks(address: str) -> tuple[int, int]:
    with grpc.insecure_channel(address) as channel:
        load = worker_pb2_grpc.DecodeWorkerStub(channel).Stats(
            worker_pb2.DecodeStatsRequest(), timeout=10).load
    return load.num_free_blocks, load.num_total_blocks


def test_plain_processes_equal_colocated(cluster: dict[str, Proc], tiny_llama: Path) -> None:
    rng = random.Random(3)
    prompts = [[rng.randrange(100, 40000) for _ in range(n)] for n in (2, 9, 30, 61, 100)]
    llm = LLM(model=str(tiny_llama), num_kv_blocks=128, block_size=8)
    expected = [o.token_ids for o in llm.generate(prompts, SamplingParams(**GREEDY))]
    with Client(cluster["router"].fields[2], timeout=60) as client:
        got = [client.generate(p, **GREEDY) for p in prompts]
    assert [c.token_ids for c in got] == expected
    assert {c.timings.prefill_local for c in got} == {True, False}
    assert all(c.timings.kv_transfer_ms >= 0 for c in got)


def test_frozen_prefill_worker_is_bypassed(cluster: dict[str, Proc], tiny_llama: Path) -> None:
    """A prefill worker that stops answering: the router's Prefill deadline passes, the
    request resumes with the decode worker prefilling it (same tokens), and every block is
    freed on both sides once the frozen worker comes back."""
    decode_address = cluster["decode"].fields[3]
    prefill = cluster["prefill"]
    prompt = list(range(200, 260))
    llm = LLM(model=str(tiny_llama), num_kv_blocks=128, block_size=8)
    expected = llm.generate([prompt], SamplingParams(**GREEDY))[0].token_ids
    free_before = _decode_free_blocks(decode_address)
    prefill.popen.send_signal(signal.SIGSTOP)
    try:
        with Client(cluster["router"].fields[2], timeout=30, max_retries=0) as client:
            out = client.generate(prompt, **GREEDY)
        assert out.token_ids == expected
        assert out.timings is not None and out.timings.prefill_local
        deadline = time.monotonic() + 10
        while _decode_free_blocks(decode_address) != free_before:
            assert time.monotonic() < deadline, "decode worker kept the request's blocks"
            time.sleep(0.1)
    finally:
        prefill.popen.send_signal(signal.SIGCONT)
    with grpc.insecure_channel(prefill.fields[3]) as channel:
        stub = worker_pb2_grpc.PrefillWorkerStub(channel)
        deadline = time.monotonic() + 20
        while True:
            load = stub.Stats(worker_pb2.PrefillStatsRequest(), timeout=10).load
            if load.num_free_blocks == load.num_total_blocks and not load.num_running:
                break
            assert time.monotonic() < deadline, "prefill worker kept the request's blocks"
            time.sleep(0.2)
    # And the deployment serves again.
    with Client(cluster["router"].fields[2], timeout=60) as client:
        assert client.generate(list(range(300, 340)), **GREEDY).finish_reason == "length"
