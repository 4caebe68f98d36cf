"""`splitserve bench route`: routing decisions per second over many simulated workers.

    splitserve bench route [--num-workers 1000] [--decisions 20000] [--reference-decisions 500]
                           [--policy all|kv_aware|least_loaded|round_robin|latency]
                           [--prefill-fraction 0.5] [--prompt-len 512] [--heartbeat-s 1.0]
                           [--concurrency 8] [--repeat 1] [--redis]

No model and no RPC: the router's decision path on the cluster state alone. Workers are
registered in a cluster store (in-memory; with --redis also a redis-server from PATH) with
seeded loads, step times and prefix-cache contents (64 prompts of --prompt-len tokens, a
few prefixes per worker). Each worker heartbeats every --heartbeat-s with a new load and
prefix events (a prompt's prefix stored, part of another evicted): with the in-memory store
interleaved with the decisions at the 10,000/s pace, in the router's process as they would
be; with Redis from a process of their own, as workers on other hosts. One decision is
what admit_request (router.dispatch) decides before it calls a worker:

  WorkerDirectory.snapshot() (a store read every 0.25 s; for Redis also the prefix log, into
  the router's mirror: cluster.prefix_mirror), the prefix overlap of the prompt's block
  hashes, weighted_overlap, the decode ranking (3 attempts), the route of the first (the
  prefill policy, or the latency policy's predicted best route), and the request's load
  assigned to its decode (and prefill) worker, released 2,000 decisions later.

Two ways, same requests, per policy and store: `router`, the indexed path the router runs
(router.worker_index); `reference`, the same decisions made the way the router made them
before the index (every view rebuilt per request, the list policies), on the same store
client. Prints each one's decisions/s (wall clock; the median of --repeat runs), the
router's decisions per CPU second of this process (its threads included: what a machine
shared with other work gives it is not counted against it), the ratio of the two ways, and
the router's ratio to the 10,000/s target; never asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import random
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from splitserve.cluster.memory import InMemoryClusterStore
from splitserve.cluster.store import ClusterStore, WorkerInfo, WorkerLoadReport, WorkerRole
from splitserve.common.step_time import StepTimeModel
from splitserve.router.cluster_io import AsyncStore
from splitserve.router.latency import (
    RoutePrediction,
    best_routes,
    best_routes_from,
    order_routes,
)
from splitserve.router.policy import (
    PrefillPolicy,
    Route,
    RoutingRules,
    blocks_needed,
    make_prefill_policy,
    plan_route,
    plan_route_from,
    rank_decode_workers,
    weighted_overlap,
)
from splitserve.router.worker_index import Assignment, ClusterSnapshot
from splitserve.router.workers import WorkerDirectory

TARGET_PER_S = 10_000
POLICIES = ("kv_aware", "least_loaded", "round_robin", "latency")
_MODEL = "sim-model"
_BLOCK_SIZE = 16
_TOTAL_BLOCKS = 4096
_IN_FLIGHT = 2000  # assignments held before the oldest is released (requests finishing)
_ATTEMPTS = 3  # RouterConfig.max_admit_attempts
_MAX_TOKENS = 128


class EventLike(Protocol):
    def is_set(self) -> bool: ...


def _load(rng: random.Random) -> WorkerLoadReport:
    model = StepTimeModel(base_ms=rng.uniform(2, 4), per_seq_ms=rng.uniform(0.05, 0.2),
                          per_prompt_token_ms=rng.uniform(0.02, 0.05), token_budget=512)
    return WorkerLoadReport(num_waiting=rng.randrange(4), num_running=rng.randrange(64),
                            num_free_blocks=rng.randrange(_TOTAL_BLOCKS),
                            num_queued_tokens=rng.randrange(8192), step_model=model)


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


def churn(store: ClusterStore, rng: random.Random, worker_ids: list[str],
          prompts: list[list[int]]) -> None:
    """One worker's heartbeat: a new load, and prefix events: a prompt evicted, and now and
    then a prompt's prefix stored, at rates that keep the ~3 prompts per worker populate
    gave (P(held) = 1/20 / (1/20 + 1) ~ 3/64)."""
    wid = rng.choice(worker_ids)
    store.heartbeat(wid, _load(rng), ttl_s=3600)
    stored = rng.choice(prompts)[:rng.randrange(1, len(prompts[0]) + 1)]
    store.publish_prefix_events(wid, stored if rng.random() < 1 / 20 else [],
                                rng.choice(prompts))


def churn_redis(url: str, worker_ids: list[str], prompts: list[list[int]], per_s: float,
                seed: int, stop: EventLike) -> None:
    """`churn` at `per_s` on the Redis store at `url` until `stop` is set (a process of its
    own: the workers' heartbeats cost Redis, not the router)."""
    from splitserve.cluster.redis_store import RedisClusterStore

    store, rng = RedisClusterStore(url), random.Random(seed)
    start, done = time.monotonic(), 0
    while not stop.is_set():
        due = int((time.monotonic() - start) * per_s)
        for _ in range(due - done):
            churn(store, rng, worker_ids, prompts)
        done = max(done, due)
        time.sleep(0.002)
    store.close()


@dataclass(frozen=True)
class _Decider:
    """One policy's decision for a prompt, as admit_request makes it (its first attempt)."""

    store: AsyncStore
    policy: PrefillPolicy
    latency: bool
    rules: RoutingRules
    prompt_len: int
    num_blocks: int

    async def indexed(self, directory: WorkerDirectory, snapshot: ClusterSnapshot,
                      hashes: list[int]) -> Route:
        ranked = snapshot.rank_decode(self.num_blocks, _ATTEMPTS)
        scope = snapshot.overlap_scope(ranked, self.latency or self.policy.reads_prefill_overlap)
        overlap = await self.store.weighted_prefix_overlap(hashes, scope, self.rules)
        if self.latency:
            routes = best_routes_from(ranked, snapshot.prefill_candidates(), self.prompt_len,
                                      overlap, _BLOCK_SIZE)
            if routes:
                return self._first(routes).route
        return plan_route_from(ranked[0], snapshot.prefill_candidates(ranked[0].worker_id),
                               self.prompt_len, overlap, self.rules, self.policy)

    async def reference(self, directory: WorkerDirectory, snapshot: ClusterSnapshot,
                        hashes: list[int]) -> Route:
        overlap = weighted_overlap(await self.store.prefix_overlap_tiers(hashes), self.rules)
        decode, prefill = directory.reference_views()
        ranked = rank_decode_workers(decode, self.num_blocks)[:_ATTEMPTS]
        if self.latency:
            routes = best_routes(ranked, prefill, self.prompt_len, overlap, _BLOCK_SIZE)
            if routes:
                return self._first(routes).route
        return plan_route(ranked[0], prefill, self.prompt_len, overlap, self.rules, self.policy)

    def _first(self, routes: list[RoutePrediction]) -> RoutePrediction:
        """The one dispatch._latency_routes tries first (a request without a TTFT SLO)."""
        return order_routes(routes, self.num_blocks, _MAX_TOKENS)[0]


async def bench_router(store: ClusterStore, worker_ids: list[str], requests: list[list[int]],
                       prompts: list[list[int]], policy_name: str, indexed: bool,
                       args: argparse.Namespace, churn_here: bool = True
                       ) -> tuple[float, float]:
    """Decisions per second and per CPU second of this process (its threads included) of
    the router's decision path on `store` with one policy, made by
    --concurrency requests at a time (as a router's requests share its event loop: the one
    that awaits a store read does not hold up the others); `churn_here`: the workers'
    heartbeats interleaved with the decisions (a store in this process)."""
    rng = random.Random(args.seed + 1)
    async_store = AsyncStore(store)
    directory = WorkerDirectory(async_store, _MODEL, _BLOCK_SIZE, refresh_s=0.25)
    latency = policy_name == "latency"
    rules = RoutingRules(block_size=_BLOCK_SIZE, local_prefill_threshold=0)
    decider = _Decider(async_store, make_prefill_policy("kv_aware" if latency else policy_name),
                       latency, rules, args.prompt_len,
                       blocks_needed(args.prompt_len + _MAX_TOKENS, _BLOCK_SIZE))
    decide = decider.indexed if indexed else decider.reference
    heartbeats_per_decision = len(worker_ids) / (args.heartbeat_s * TARGET_PER_S)
    owed = 0.0
    in_flight: deque[Assignment] = deque()
    todo = iter(requests)

    async def requester() -> None:
        nonlocal owed
        for hashes in todo:
            snapshot = await directory.snapshot()
            route = await decide(directory, snapshot, hashes)
            in_flight.append(directory.assign(route.decode.worker_id, running=1,
                                              blocks=decider.num_blocks))
            if route.prefill is not None:
                in_flight.append(directory.assign(route.prefill.worker_id,
                                                  queued_tokens=args.prompt_len))
            while len(in_flight) > _IN_FLIGHT:
                directory.release(in_flight.popleft())
            if churn_here:
                owed += heartbeats_per_decision
                while owed >= 1.0:
                    churn(store, rng, worker_ids, prompts)
                    owed -= 1.0

    await directory.snapshot(force=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    await asyncio.gather(*(requester() for _ in range(args.concurrency)))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    await directory.close()
    return len(requests) / elapsed, len(requests) / cpu


def _bench_store(name: str, store: ClusterStore, args: argparse.Namespace,
                 prompts: list[list[int]], requests: list[list[int]],
                 url: str | None = None) -> None:
    """Every policy on `store`; with `url` (Redis), the heartbeats come from a process of
    their own at the 10,000/s pace's rate, else interleaved with the decisions."""
    ids = populate(store, args.num_workers, args.prefill_fraction, prompts, args.seed)
    few = requests[: args.reference_decisions]
    for policy in POLICIES if args.policy == "all" else (args.policy,):
        rates: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for _ in range(args.repeat):
            for indexed in (False, True):
                if indexed or args.reference_decisions:
                    with _churning(url, ids, prompts, args) as churn_here:
                        rates[indexed].append(asyncio.run(bench_router(
                            store, ids, requests if indexed else few, prompts, policy, indexed,
                            args, churn_here)))
        fast = statistics.median(r[0] for r in rates[True])
        fast_cpu = statistics.median(r[1] for r in rates[True])
        slow = statistics.median(r[0] for r in rates[False]) if rates[False] else float("nan")
        print(f"{name:8s} {policy:13s} {slow:12.0f} {fast:11.0f} {fast_cpu:13.0f} "
              f"{fast / slow:17.1f}x {fast / TARGET_PER_S:13.2f}x", flush=True)


@contextlib.contextmanager
def _churning(url: str | None, worker_ids: list[str], prompts: list[list[int]],
              args: argparse.Namespace) -> Iterator[bool]:
    """Yields whether the caller churns in-process; with a Redis `url`, a process does."""
    if url is None:
        yield True
        return
    ctx = multiprocessing.get_context("fork")  # spawn would re-import the caller's main
    stop = ctx.Event()
    proc = ctx.Process(target=churn_redis, args=(url, worker_ids, prompts,
                                                  len(worker_ids) / args.heartbeat_s,
                                                  args.seed + 2, stop), daemon=True)
    proc.start()
    try:
        yield False
    finally:
        stop.set()
        proc.join(10)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="splitserve bench route", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-workers", type=int, default=1000)
    ap.add_argument("--decisions", type=int, default=20000, help="per run of the router path")
    ap.add_argument("--reference-decisions", type=int, default=500,
                    help="per run of the reference path (0: skip it)")
    ap.add_argument("--policy", default="all", choices=("all", *POLICIES))
    ap.add_argument("--prefill-fraction", type=float, default=0.5)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--heartbeat-s", type=float, default=1.0)
    ap.add_argument("--concurrency", type=int, default=8, help="requests deciding at a time")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each; the median is shown")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--redis", action="store_true", help="also on a redis-server from PATH")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    prompts = _prompt_hashes(rng, 64, args.prompt_len // _BLOCK_SIZE)
    requests = [rng.choice(prompts) for _ in range(args.decisions)]
    print(f"{args.num_workers} workers ({args.prefill_fraction * 100:.0f}% prefill), "
          f"prompts of {args.prompt_len} tokens, heartbeats every {args.heartbeat_s:g} s per "
          f"worker; {args.decisions} decisions per run ({args.reference_decisions} for the "
          f"reference), median of {args.repeat}; target {TARGET_PER_S}/s")
    print(f"{'store':8s} {'policy':13s} {'reference/s':>12s} {'router/s':>11s} "
          f"{'router/cpu-s':>13s} {'router/reference':>18s} {'router/target':>14s}")
    _bench_store("memory", InMemoryClusterStore(), args, prompts, requests)
    if args.redis:
        if shutil.which("redis-server") is None:
            print("redis    skipped: no redis-server on PATH")
            return 0
        from splitserve.cluster.redis_store import RedisClusterStore

        with redis_server() as url:
            store = RedisClusterStore(url)
            try:
                _bench_store("redis", store, args, prompts, requests, url)
            finally:
                store.close()
    return 0



@contextlib.contextmanager
def redis_server() -> Iterator[str]:
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
