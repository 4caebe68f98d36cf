"""A worker whose engine fails mid-stream (a step raises: out of memory, a bug) loses no
request: the router, the workers and the client are real (in-process, real gRPC and gloo);
the failing step is injected into one worker's engine.

The failed worker ends each of its requests as lost (UNAVAILABLE), reports NOT_SERVING and
leaves cluster state; the router resumes the requests on the other workers from the last
token the client got, so greedy outputs equal the colocated engine's, and the survivors end
with every block free.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from splitserve.client import Client
from splitserve.common.sampling_params import SamplingParams
from splitserve.decode_worker.worker import DecodeWorker
from splitserve.llm import LLM
from splitserve.prefill_worker.worker import PrefillWorker
from tests.service.deployment import Deployment, start_deployment

ENGINE = {"num_kv_blocks": 256, "block_size": 8, "max_num_batched_tokens": 256}
MAX_TOKENS = 80


def _prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(rng.choice([20, 45, 90]))]
            for _ in range(count)]


def _expected(tiny_llama: Path, prompts: list[list[int]]) -> list[list[int]]:
    llm = LLM(model=str(tiny_llama), **ENGINE)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [o.token_ids for o in llm.generate(prompts, params)]


def _generate(address: str, prompt: list[int]) -> tuple[list[int], str]:
    with Client(address, timeout=120) as client:
        out = client.generate(prompt, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return out.token_ids, out.finish_reason


def _fail_next_step(worker: DecodeWorker | PrefillWorker) -> None:
    def failing_step() -> list[object]:
        raise RuntimeError("injected engine failure")

    worker.engine.step = failing_step  # type: ignore[method-assign]


def _until(condition, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _live_ids(d: Deployment) -> set[str]:
    return {info.worker_id for info, _ in d.router.store.live_workers()}


def _resumes(d: Deployment, reason: str) -> int:
    value = d.router.metrics.registry.get_sample_value(
        "splitserve_request_resumes_total", {"reason": reason})
    return int(value or 0)


@pytest.mark.parametrize("output_channels", [True, False], ids=["channel", "admit-stream"])
def test_a_decode_engine_failing_mid_stream_loses_no_request(tiny_llama: Path,
                                                             output_channels: bool) -> None:
    prompts = _prompts(8, seed=3)
    expected = _expected(tiny_llama, prompts)
    d = start_deployment(str(tiny_llama), 1, 2, engine=ENGINE,
                         router={"local_prefill_threshold": 32},
                         worker_options={"output_channels": output_channels})
    try:
        failing, survivor = d.decode
        with ThreadPoolExecutor(len(prompts)) as pool:
            results = [pool.submit(_generate, d.address, p) for p in prompts]
            # Fail it once it decodes some of them (each has tokens out already).
            _until(lambda: failing.loop.load.num_running >= 2)
            time.sleep(0.3)
            _fail_next_step(failing)
            outs = [r.result(120) for r in results]
        assert [tokens for tokens, _ in outs] == expected
        # Those it held were resumed as from a worker lost (counted against their resumes).
        assert _resumes(d, "decode_lost") >= 2
        assert {reason for _, reason in outs} == {"length"}
        assert failing.failed.is_set()
        _until(lambda: failing.worker_id not in _live_ids(d))
        assert not survivor.failed.is_set()
        # The deployment goes on serving with the survivor.
        assert _generate(d.address, prompts[0]) == (expected[0], "length")
        state = d.wait_all_blocks_free(workers=[*d.prefill, survivor])
        assert all(free == total for free, total in state.values()), state
    finally:
        d.stop()


def test_a_prefill_engine_failing_loses_no_request(tiny_llama: Path) -> None:
    prompts = _prompts(6, seed=4)
    expected = _expected(tiny_llama, prompts)
    d = start_deployment(str(tiny_llama), 2, 1, engine=ENGINE,
                         router={"local_prefill_threshold": 8})
    try:
        # The first prefill step on either prefill worker fails (whichever the router
        # picks first); every other step runs.
        failed: list[PrefillWorker] = []
        for worker in d.prefill:
            worker.engine.step = _fail_first_of_all(worker, failed)  # type: ignore[method-assign]
        with ThreadPoolExecutor(len(prompts)) as pool:
            outs = list(pool.map(lambda p: _generate(d.address, p), prompts))
        assert [tokens for tokens, _ in outs] == expected
        assert {reason for _, reason in outs} == {"length"}
        [failing] = failed
        [survivor] = [w for w in d.prefill if w is not failing]
        assert _resumes(d, "prefill_lost") >= 1
        assert failing.failed.is_set() and not survivor.failed.is_set()
        _until(lambda: failing.worker_id not in _live_ids(d))
        state = d.wait_all_blocks_free(workers=[survivor, *d.decode])
        assert all(free == total for free, total in state.values()), state
    finally:
        d.stop()


_FIRST = threading.Lock()  # (the two workers' first steps may come at once)


def _fail_first_of_all(worker: PrefillWorker, failed: list[PrefillWorker]):  # type: ignore[no-untyped-def]
    step = worker.engine.step

    def first_fails() -> list[object]:
        with _FIRST:
            first = not failed
            if first:
                failed.append(worker)
        if first:
            raise RuntimeError("injected engine failure")
        return step()

    return first_fails
