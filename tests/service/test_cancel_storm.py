"""A storm of cancellations at random phases (queued, admitting, prefilling, decoding)
leaves no KV block held on any worker, and the deployment keeps serving."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from splitserve.client import Client
from splitserve.common.convert.common import sampling_to_proto
from splitserve.common.sampling_params import SamplingParams
from splitserve.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.service.deployment import Deployment, start_deployment

ENGINE = {"num_kv_blocks": 512, "block_size": 8, "max_num_batched_tokens": 256}

pytestmark = pytest.mark.chaos


@pytest.fixture(scope="module")
def deployment(tiny_llama: Path) -> Iterator[Deployment]:
    d = start_deployment(str(tiny_llama), 1, 2, engine=ENGINE,
                         router={"local_prefill_threshold": 16})
    yield d
    d.stop()


async def _storm(address: str, count: int, seed: int) -> dict[str, int]:
    """`count` concurrent streams, each cancelled after a random 0-400 ms."""
    rng = random.Random(seed)
    outcome = {"cancelled": 0, "finished": 0}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.SplitServeStub(channel)

        async def one() -> None:
            prompt = [rng.randrange(100, 40000) for _ in range(rng.choice([4, 40, 120]))]
            call = stub.Generate(router_pb2.GenerateRequest(
                token_ids=router_pb2.TokenIds(token_ids=prompt),
                sampling_params=common_pb2.SamplingParams(
                    max_tokens=400, temperature=0.0, ignore_eos=True),
            ))
            delay = rng.uniform(0.0, 0.4)

            async def read_all() -> None:
                async for _ in call:
                    pass

            try:
                await asyncio.wait_for(read_all(), delay)
                outcome["finished"] += 1
            except asyncio.TimeoutError:
                call.cancel()
                outcome["cancelled"] += 1

        await asyncio.gather(*(one() for _ in range(count)))
    return outcome


def test_cancel_storm_frees_every_block_promptly(deployment: Deployment) -> None:
    outcome = asyncio.run(_storm(deployment.address, 200, seed=11))
    assert outcome["cancelled"] > 150, outcome
    cancelled_at = time.monotonic()
    # Within 5 s: half the deployment's kv_timeout_s (10 s), which would free a leaked
    # transfer's blocks anyway (on an idle machine it takes well under a second).
    state = deployment.wait_all_blocks_free(timeout_s=5.0)
    waited = time.monotonic() - cancelled_at
    assert all(free == total for free, total in state.values()), (state, waited)
    # Nothing still generating for a client that left.
    running = [w.loop.call(lambda e: len(e.requests)) for w in deployment.decode]
    assert running == [0, 0]
    # And the deployment serves again.
    with Client(deployment.address, timeout=60) as client:
        out = client.generate([5, 6, 7], max_tokens=4, temperature=0.0, ignore_eos=True)
    assert out.finish_reason == "length" and len(out.token_ids) == 4


@pytest.mark.parametrize("prefill_locally", [True, False])
def test_admit_cancelled_while_the_engine_is_busy_frees_the_request(
    deployment: Deployment, prefill_locally: bool
) -> None:
    """The router cancels D.Admit while D's admit waits for its engine thread (a busy
    step): the admission that completes afterwards must not outlive the stream."""
    worker = deployment.decode[0]
    total = worker.loop.call(lambda e: e.block_manager.num_blocks)
    stall = worker.loop.submit(lambda e: time.sleep(0.6))  # the engine thread is busy
    with grpc.insecure_channel(worker.address) as channel:
        call = worker_pb2_grpc.DecodeWorkerStub(channel).Admit(worker_pb2.AdmitRequest(
            request_id="cancelled-while-admitting", prompt_token_ids=list(range(100, 140)),
            sampling_params=sampling_to_proto(
                SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)),
            prefill_locally=prefill_locally,
            prefill_worker_id="" if prefill_locally else deployment.prefill[0].worker_id,
            prefill_timeout_ms=60_000,
        ))
        time.sleep(0.2)
        call.cancel()
    stall.result(5)
    deadline = time.monotonic() + 5.0  # (half the kv_timeout_s that would free them anyway)
    while True:
        free, held = worker.loop.call(
            lambda e: (e.block_manager.num_free_blocks, len(e.requests) + worker.num_pending()))
        if free == total and held == 0:
            break
        assert time.monotonic() < deadline, f"{total - free} blocks, {held} requests held"
        time.sleep(0.02)
