"""Where a routing decision's time goes: `splitserve bench route`'s decision loop (in-memory
store, 1,000 simulated workers, the workers' heartbeats interleaved) with each part timed.

    PYTHONPATH=. .venv/bin/python benchmarks/route_decision_parts.py [--policy kv_aware|latency]
        [--decisions 30000] [--num-workers 1000]

Parts, as router.dispatch.admit_request runs them: snapshot (WorkerDirectory.snapshot),
rank_decode (the decode ranking, 3 attempts), overlap (the scope and the weighted prefix
overlap), route (kv_aware: the prefill candidates and plan_route_from; latency:
best_routes_from and order_routes), assign (the decode and prefill assignments), release
(the oldest assignments beyond 2,000 in flight), churn (heartbeats and prefix events at the
10,000/s pace's rate). The timers cost the loop a few percent: `bench route` is the rate.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections import deque

from splitserve.cluster.memory import InMemoryClusterStore
from splitserve.router.cluster_io import AsyncStore
from splitserve.router.latency import best_routes_from, order_routes
from splitserve.router.policy import (
    Route,
    RoutingRules,
    blocks_needed,
    make_prefill_policy,
    plan_route_from,
)
from splitserve.router.worker_index import Assignment
from splitserve.router.workers import WorkerDirectory
from splitserve.sim import route_bench as rb

PARTS = ("snapshot", "rank_decode", "overlap", "route", "assign", "release", "churn")
_PROMPT_LEN, _MAX_TOKENS, _BLOCK_SIZE, _IN_FLIGHT = 512, 128, 16, 2000


async def measure(policy: str, decisions: int, num_workers: int) -> tuple[float, dict[str, float]]:
    """(seconds in all, seconds per part) of `decisions` decisions."""
    rng = random.Random(0)
    prompts = rb._prompt_hashes(rng, 64, _PROMPT_LEN // _BLOCK_SIZE)
    requests = [rng.choice(prompts) for _ in range(decisions)]
    store = InMemoryClusterStore()
    ids = rb.populate(store, num_workers, 0.5, prompts, 0)
    async_store = AsyncStore(store)
    directory = WorkerDirectory(async_store, rb._MODEL, _BLOCK_SIZE, refresh_s=0.25)
    rules = RoutingRules(block_size=_BLOCK_SIZE, local_prefill_threshold=0)
    kv_aware = make_prefill_policy("kv_aware")
    num_blocks = blocks_needed(_PROMPT_LEN + _MAX_TOKENS, _BLOCK_SIZE)
    heartbeats_per_decision = num_workers / (1.0 * rb.TARGET_PER_S)
    spent = dict.fromkeys(PARTS, 0.0)
    in_flight: deque[Assignment] = deque()
    churn_rng, owed = random.Random(1), 0.0
    clock = time.perf_counter
    await directory.snapshot(force=True)
    started = clock()
    for hashes in requests:
        t0 = clock()
        snapshot = await directory.snapshot()
        t1 = clock()
        ranked = snapshot.rank_decode(num_blocks, 3)
        t2 = clock()
        scope = snapshot.overlap_scope(ranked, True)
        overlap = await async_store.weighted_prefix_overlap(hashes, scope, rules)
        t3 = clock()
        if policy == "latency":
            routes = best_routes_from(ranked, snapshot.prefill_candidates(), _PROMPT_LEN,
                                      overlap, _BLOCK_SIZE)
            assert routes
            route: Route = order_routes(routes, num_blocks, _MAX_TOKENS)[0].route
        else:
            route = plan_route_from(ranked[0], snapshot.prefill_candidates(ranked[0].worker_id),
                                    _PROMPT_LEN, overlap, rules, kv_aware)
        t4 = clock()
        in_flight.append(directory.assign(route.decode.worker_id, running=1, blocks=num_blocks))
        if route.prefill is not None:
            in_flight.append(directory.assign(route.prefill.worker_id,
                                              queued_tokens=_PROMPT_LEN))
        t5 = clock()
        while len(in_flight) > _IN_FLIGHT:
            directory.release(in_flight.popleft())
        t6 = clock()
        owed += heartbeats_per_decision
        while owed >= 1.0:
            rb.churn(store, churn_rng, ids, prompts)
            owed -= 1.0
        t7 = clock()
        for part, (a, b) in zip(PARTS, ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5),
                                        (t5, t6), (t6, t7)), strict=True):
            spent[part] += b - a
    total = clock() - started
    await directory.close()
    return total, spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", choices=("kv_aware", "latency"), default="kv_aware")
    parser.add_argument("--decisions", type=int, default=30000)
    parser.add_argument("--num-workers", type=int, default=1000)
    args = parser.parse_args()
    total, spent = asyncio.run(measure(args.policy, args.decisions, args.num_workers))
    n = args.decisions
    print(f"{args.policy}: {n / total:.0f} decisions/s with the timers, "
          f"{total / n * 1e6:.1f} us each")
    for part, seconds in spent.items():
        print(f"  {part:12s} {seconds / n * 1e6:6.1f} us  {100 * seconds / total:5.1f}%")


if __name__ == "__main__":
    main()
