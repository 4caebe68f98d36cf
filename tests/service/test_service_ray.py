"""The service under Ray, as `splitserve serve` runs it: router and workers are Ray actors
(separate processes), KV moves over gloo between them, cluster state is the router's
embedded store or a real redis-server."""

from __future__ import annotations

import os
import random
import re
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from splitserve.client import Client
from splitserve.common.sampling_params import SamplingParams
from splitserve.engine.config import EngineConfig
from splitserve.launcher import ServeOptions, init_ray, serve, stop_ray
from splitserve.llm import LLM

ENGINE = {"num_kv_blocks": 256, "block_size": 8, "max_num_batched_tokens": 256, "num_threads": 1}
GREEDY = {"max_tokens": 12, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    import ray  # noqa: F401 - its import sets RAY_CLIENT_MODE=0 (not init_ray's doing)

    before = {k: v for k, v in os.environ.items() if k.startswith("RAY_")}
    started = init_ray(None, num_cpus=2)
    yield
    if started:
        stop_ray()
        # ray.init's RAY_* variables are gone again: a later `ray start` from this process's
        # environment may join a multi-node cluster (tests/multihost/test_netns_ray.py).
        assert {k: v for k, v in os.environ.items() if k.startswith("RAY_")} == before


def _prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(rng.choice([5, 40, 70, 120]))]
            for _ in range(count)]


def _run(address: str, prompts: list[list[int]]) -> list[list[int]]:
    def one(prompt: list[int]) -> list[int]:
        with Client(address, timeout=120) as client:
            return client.generate(prompt, **GREEDY).token_ids

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def _expected(model: str, prompts: list[list[int]], **engine: object) -> list[list[int]]:
    llm = LLM(model=model, **engine)
    return [o.token_ids for o in llm.generate(prompts, SamplingParams(**GREEDY))]


_OURS = re.compile(r'users:\(\("(python|ray|gcs_server|raylet|redis|dashboard)')
_LOOPBACK = ("127.0.0.1:", "[::1]:", "[::ffff:127.0.0.1]:")


def _listeners_beyond_loopback() -> list[str]:
    """Listening sockets of this deployment's processes (python, Ray's, redis) that are not
    bound to loopback. Ray's workers show up as "ray::<name>"."""
    out = subprocess.run(["ss", "-Htlnp"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in out
            if _OURS.search(line) and not any(a in line.split()[3] for a in _LOOPBACK)]


@pytest.mark.parametrize("use_redis", [False, True], ids=["embedded-store", "redis"])
def test_ray_2p2d_tiny_32_concurrent(ray_session, tiny_llama: Path, use_redis: bool,  # type: ignore[no-untyped-def]
                                     request: pytest.FixtureRequest) -> None:
    redis_url = request.getfixturevalue("redis_url") if use_redis else None
    prompts = _prompts(32, seed=1)
    expected = _expected(str(tiny_llama), prompts, **ENGINE)
    deployment = serve(ServeOptions(
        engine=EngineConfig(model=str(tiny_llama), **ENGINE), prefill_workers=2,
        decode_workers=2, port=0, http_port=0, redis_url=redis_url,
        router_options={"local_prefill_threshold": 8},
    ))
    try:
        assert _run(deployment.address, prompts) == expected
        if redis_url:
            assert deployment.cluster_url == redis_url
        assert _listeners_beyond_loopback() == []
        assert _ray_auth_mode() == "TOKEN"  # Ray's token authentication stays on
    finally:
        deployment.shutdown()


def _ray_auth_mode() -> str:
    from ray._raylet import AuthenticationMode, get_authentication_mode

    mode = get_authentication_mode()
    return "TOKEN" if mode == AuthenticationMode.TOKEN else str(mode)


def test_ray_1p1d_smollm2(ray_session, smollm2_dir: Path) -> None:  # type: ignore[no-untyped-def]
    engine = {"num_kv_blocks": 128, "num_threads": 1}
    questions = ["What is the capital of France?", "Name three colors.",
                 "Write one sentence about the moon and the tides it causes on the sea."]
    llm = LLM(model="smollm2-135m", **engine)
    conversations = [[{"role": "user", "content": q}] for q in questions]
    expected = [o.token_ids for o in llm.chat(conversations, SamplingParams(**GREEDY))]
    del llm
    deployment = serve(ServeOptions(engine=EngineConfig(model="smollm2-135m", **engine),
                                    prefill_workers=1, decode_workers=1, port=0, http_port=0,
                                    router_options={"local_prefill_threshold": 0}))
    try:
        with Client(deployment.address, timeout=120) as client:
            got = [client.chat(c, **GREEDY).token_ids for c in conversations]
        assert got == expected
    finally:
        deployment.shutdown()


def test_workers_added_and_removed_while_serving(ray_session, tiny_llama: Path) -> None:  # type: ignore[no-untyped-def]
    """Deployment.add_worker (what the autoscaler calls): a second decode worker started
    into a running deployment registers, the router routes to it, tokens stay exact; its
    removal drains it and the deployment goes on with the first."""
    import time

    prompts = _prompts(8, seed=3)
    expected = _expected(str(tiny_llama), prompts, **ENGINE)
    deployment = serve(ServeOptions(
        engine=EngineConfig(model=str(tiny_llama), **ENGINE), prefill_workers=1,
        decode_workers=1, port=0, http_port=0,
        router_options={"local_prefill_threshold": 8, "worker_refresh_s": 0.2},
        stream_interval=4,
    ))
    try:
        address = deployment.add_worker("decode")
        assert deployment.counts() == {"prefill": 1, "decode": 2}
        with Client(deployment.address, timeout=60) as client:
            deadline = time.monotonic() + 30
            while client.list_models()[0].num_decode_workers < 2:
                assert time.monotonic() < deadline, "the router never saw the added worker"
                time.sleep(0.2)
        # Decoded on both: the router spreads 8 concurrent streams by load.
        results = []

        def one(prompt: list[int]) -> tuple[list[int], str]:
            with Client(deployment.address, timeout=120) as c:
                out = c.generate(prompt, **GREEDY)
                assert out.timings is not None
                return out.token_ids, out.timings.decode_worker_id

        with ThreadPoolExecutor(len(prompts)) as pool:
            results = list(pool.map(one, prompts))
        assert [tokens for tokens, _ in results] == expected
        assert {"decode-0", "decode-1"} <= {worker for _, worker in results}, results
        # serve(stream_interval=4): the decode workers send tokens in groups (an added one
        # is started with the same settings as the first).
        for _ in range(4):
            with Client(deployment.address, timeout=60) as c:
                sizes = [len(ch.token_ids) for ch in c.stream(prompts[0], **GREEDY)
                         if ch.token_ids]
            assert sum(sizes) == len(expected[0]) and len(sizes) < len(expected[0]) / 2, sizes
        assert address and deployment.remove_worker("decode")
        assert deployment.counts() == {"prefill": 1, "decode": 1}
        assert _run(deployment.address, prompts[:2]) == expected[:2]
        with pytest.raises(ValueError, match="role must be"):
            deployment.add_worker("router")
    finally:
        deployment.shutdown()
    with pytest.raises(RuntimeError, match="shutting down"):  # (the autoscaler's late call)
        deployment.add_worker("decode")
    assert not deployment.remove_worker("decode")


def test_a_worker_whose_engine_failed_or_whose_actor_died_is_replaced(  # type: ignore[no-untyped-def]
        ray_session, tiny_llama: Path) -> None:
    import ray

    prompts = _prompts(4, seed=5)
    expected = _expected(str(tiny_llama), prompts, **ENGINE)
    deployment = serve(ServeOptions(
        engine=EngineConfig(model=str(tiny_llama), **ENGINE), prefill_workers=1,
        decode_workers=2, port=0, http_port=0, supervise_interval_s=0.5,
        router_options={"local_prefill_threshold": 8},
    ))
    supervisor = deployment.supervisor
    assert supervisor is not None

    def fail_the_engine(actor: object) -> None:  # (nested: pickled by value into the actor)
        """Run inside a worker actor (`__ray_call__`): its engine's next step raises, and a
        request is queued so that a step comes."""
        from splitserve.common.sampling_params import SamplingParams as Params

        worker = actor.worker  # type: ignore[attr-defined]

        def failing_step() -> list[object]:
            raise RuntimeError("injected engine failure")

        worker.engine.step = failing_step
        worker.loop.call(lambda e: e.add_request([5, 6, 7], Params(max_tokens=2), "poke"))

    def replaced(role: str, count: int) -> None:
        deadline = time.monotonic() + 120
        while supervisor.replaced[role] < count:
            assert time.monotonic() < deadline, (supervisor.replaced, supervisor.owed)
            time.sleep(0.2)
        time.sleep(1.0)  # the router's view (refreshed every 0.25 s) has the new worker

    try:
        assert _run(deployment.address, prompts) == expected
        [(prefill, _), (decode, _), _] = deployment.workers()
        ray.get(decode.__ray_call__.remote(fail_the_engine), timeout=60)  # decode-0
        replaced("decode", 1)
        assert _run(deployment.address, prompts) == expected
        ray.kill(prefill)  # its process dies
        replaced("prefill", 1)
        assert _run(deployment.address, prompts) == expected
        ids = sorted(ray.get([a.__ray_call__.remote(lambda actor: actor.worker.worker_id)
                              for a, _ in deployment.workers()], timeout=60))
        # Replacements take their role's next id, never a live worker's (decode-1's).
        assert ids == ["decode-1", "decode-2", "prefill-1"]
        assert supervisor.owed == {"prefill": 0, "decode": 0}
    finally:
        deployment.shutdown()
