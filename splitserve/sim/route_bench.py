"""`splitserve bench route`: routing decisions per second over many simulated workers.

    splitserve bench route [--num-workers 1000] [--decisions 20000] [--prefill-fraction 0.5]
                           [--prompt-len 512] [--heartbeat-s 1.0] [--redis]

No model and no RPC: the router's decision path on the cluster state alone. Workers are
registered in a cluster store (in-memory; with --redis a redis-server from PATH) with
seeded loads and prefix-cache contents, and heartbeat new loads at --heartbeat-s each
(interleaved with the decisions at a 10,000 decisions/s pace). Two measurements, same
requests:
  policy:  rank_decode_workers + plan_route (kv_aware) over prebuilt WorkerViews;
  router:  what a request costs the router: WorkerDirectory.snapshot() (views built from
           the store's last read, refreshed every 0.25 s, plus this router's assignments),
           the store's prefix_overlap_tiers for the prompt's block hashes, weighted_overlap,
           the policy, and assign / release of the decode worker's load.
Prints decisions/s of each and the ratio to the 10,000/s target; never asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Iterator

from splitserve.cluster.memory import InMemoryClusterStore
from splitserve.cluster.store import ClusterStore, WorkerInfo, WorkerLoadReport, WorkerRole
from splitserve.router.cluster_io import AsyncStore
from splitserve.router.policy import (
    RoutingRules,
    WorkerView,
    blocks_needed,
    make_prefill_policy,
    plan_route,
    rank_decode_workers,
    weighted_overlap,
)
from splitserve.router.workers import Assignment, WorkerDirectory

TARGET_PER_S = 10_000
_MODEL = "sim-model"
_BLOCK_SIZE = 16
_TOTAL_BLOCKS = 4096
_IN_FLIGHT = 2000  # assignments held before the oldest is released (requests finishing)


def _load(rng: random.Random) -> WorkerLoadReport:
    return WorkerLoadReport(num_waiting=rng.randrange(4), num_running=rng.randrange(64),
                            num_free_blocks=rng.randrange(_TOTAL_BLOCKS),
                            num_queued_tokens=rng.randrange(8192))


def populate(store: ClusterStore, num_workers: int, prefill_fraction: float,
             prompts: list[list[int]], seed: int) -> list[str]:
    """Register the workers with loads, and give each a few prompts' prefixes."""
    rng = random.Random(seed)
    ids = []
    for i in range(num_workers):
        role = WorkerRole.PREFILL if i < num_workers * prefill_fraction else WorkerRole.DECODE
        worker_id = f"{role.value}-{i:04d}"
        store.register_worker(WorkerInfo(worker_id, role, f"10.0.{i // 250}.{i % 250}:50051",
                                          _MODEL, _BLOCK_SIZE, _TOTAL_BLOCKS), ttl_s=3600)
        store.heartbeat(worker_id, _load(rng), ttl_s=3600)
        for hashes in rng.sample(prompts, k=min(3, len(prompts))):
            cut = rng.randrange(1, len(hashes) + 1)
            store.publish_prefix_events(worker_id, hashes[:cut], [])
        ids.append(worker_id)
    return ids


def _prompt_hashes(rng: random.Random, count: int, num_blocks: int) -> list[list[int]]:
    return [[rng.getrandbits(63) for _ in range(num_blocks)] for _ in range(count)]


def bench_policy(views: list[WorkerView], requests: list[list[int]], prompt_len: int) -> float:
    """Decisions/s of the policy alone over fixed views (no overlap: no store)."""
    rules, policy = RoutingRules(block_size=_BLOCK_SIZE, local_prefill_threshold=0), \
        make_prefill_policy("kv_aware")
    decode = [v for v in views if v.worker_id.startswith("decode")]
    prefill = [v for v in views if v.worker_id.startswith("prefill")]
    need = blocks_needed(prompt_len + 128, _BLOCK_SIZE)
    start = time.perf_counter()
    for _ in requests:
        top = rank_decode_workers(decode, need)[0]
        plan_route(top, prefill, prompt_len, {}, rules, policy)
    return len(requests) / (time.perf_counter() - start)


async def bench_router(store: ClusterStore, worker_ids: list[str], requests: list[list[int]],
                       prompt_len: int, heartbeat_s: float, seed: int) -> float:
    """Decisions/s of the router's whole decision path on `store`."""
    rng = random.Random(seed + 1)
    directory = WorkerDirectory(AsyncStore(store), _MODEL, _BLOCK_SIZE, refresh_s=0.25)
    rules, policy = RoutingRules(block_size=_BLOCK_SIZE, local_prefill_threshold=0), \
        make_prefill_policy("kv_aware")
    async_store = AsyncStore(store)
    need = blocks_needed(prompt_len + 128, _BLOCK_SIZE)
    heartbeats_per_decision = len(worker_ids) / (heartbeat_s * TARGET_PER_S)
    owed = 0.0
    in_flight: deque[Assignment] = deque()
    start = time.perf_counter()
    for hashes in requests:
        snapshot = await directory.snapshot()
        overlap = weighted_overlap(await async_store.prefix_overlap_tiers(hashes), rules)
        top = rank_decode_workers(snapshot.decode, need)[0]
        plan_route(top, snapshot.prefill, prompt_len, overlap, rules, policy)
        in_flight.append(directory.assign(top.worker_id, running=1, blocks=need))
        if len(in_flight) > _IN_FLIGHT:
            directory.release(in_flight.popleft())
        owed += heartbeats_per_decision
        while owed >= 1.0:
            store.heartbeat(rng.choice(worker_ids), _load(rng), ttl_s=3600)
            owed -= 1.0
    return len(requests) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="splitserve bench route", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-workers", type=int, default=1000)
    ap.add_argument("--decisions", type=int, default=20000)
    ap.add_argument("--prefill-fraction", type=float, default=0.5)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--heartbeat-s", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--redis", action="store_true", help="also on a redis-server from PATH")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    prompts = _prompt_hashes(rng, 64, args.prompt_len // _BLOCK_SIZE)
    requests = [rng.choice(prompts) for _ in range(args.decisions)]
    store = InMemoryClusterStore()
    ids = populate(store, args.num_workers, args.prefill_fraction, prompts, args.seed)
    views = [WorkerView(info.worker_id, num_waiting=load.num_waiting,
                        num_running=load.num_running, num_free_blocks=load.num_free_blocks,
                        num_total_blocks=info.num_total_blocks,
                        num_queued_tokens=load.num_queued_tokens)
             for info, load in store.live_workers() if load is not None]
    print(f"{args.num_workers} workers ({args.prefill_fraction * 100:.0f}% prefill), "
          f"{args.decisions} decisions, prompts of {args.prompt_len} tokens, "
          f"heartbeats every {args.heartbeat_s:g} s per worker; target {TARGET_PER_S}/s")
    policy_rate = bench_policy(views, requests, args.prompt_len)
    print(f"policy only         {policy_rate:10.0f} decisions/s  "
          f"({policy_rate / TARGET_PER_S:.2f}x the target)")
    rate = asyncio.run(bench_router(store, ids, requests, args.prompt_len, args.heartbeat_s,
                                    args.seed))
    print(f"router, in-memory   {rate:10.0f} decisions/s  ({rate / TARGET_PER_S:.2f}x the target)")
    if args.redis:
        _bench_redis(args, prompts, requests)
    return 0


@contextlib.contextmanager
def _redis_server() -> Iterator[str]:
    """A fresh redis-server (no persistence) on a free loopback port; yields its URL."""
    import redis

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="splitserve-route-redis-") as workdir:
        proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port),
                                 "--save", "", "--appendonly", "no", "--dir", workdir],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            client = redis.Redis(host="127.0.0.1", port=port)
            deadline = time.monotonic() + 10
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError("redis-server did not start") from None
                    time.sleep(0.05)
            client.close()
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(10)


def _bench_redis(args: argparse.Namespace, prompts: list[list[int]],
                 requests: list[list[int]]) -> None:
    if shutil.which("redis-server") is None:
        print("router, redis        skipped: no redis-server on PATH")
        return
    from splitserve.cluster.redis_store import RedisClusterStore

    with _redis_server() as url:
        store = RedisClusterStore(url)
        ids = populate(store, args.num_workers, args.prefill_fraction, prompts, args.seed)
        rate = asyncio.run(bench_router(store, ids, requests, args.prompt_len,
                                        args.heartbeat_s, args.seed))
        store.close()
        print(f"router, redis       {rate:10.0f} decisions/s  "
              f"({rate / TARGET_PER_S:.2f}x the target)")
