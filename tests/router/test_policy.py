"""Routing policies: exact picks for hand-built worker states."""

from __future__ import annotations

import pytest

from splitserve.common.cluster_types import PrefixOverlap
from splitserve.router.policy import (
    QUEUED_TOKENS_PER_RANK,
    KvAwarePolicy,
    LeastLoadedPolicy,
    RoundRobinPolicy,
    RoutingRules,
    WorkerView,
    blocks_needed,
    cached_tokens,
    make_prefill_policy,
    plan_route,
    rank_decode_workers,
    should_prefill_locally,
    weighted_overlap,
)

BS = 16


def w(worker_id: str, **load: int) -> WorkerView:
    return WorkerView(worker_id=worker_id, address=f"{worker_id}:1", **load)


def ids(workers: list[WorkerView]) -> list[str]:
    return [x.worker_id for x in workers]


def test_blocks_needed_and_cached_tokens() -> None:
    assert [blocks_needed(n, BS) for n in (0, 1, 15, 16, 17, 32, 33)] == [0, 1, 1, 1, 2, 2, 3]
    assert cached_tokens(2, BS, 100) == 32
    assert cached_tokens(7, BS, 100) == 100  # never more than the prompt


# ---- decode ----------------------------------------------------------------------------


def test_decode_ranking_least_running_then_waiting_then_id() -> None:
    workers = [
        w("d3", num_running=2, num_free_blocks=50),
        w("d1", num_running=1, num_waiting=3, num_free_blocks=50),
        w("d2", num_running=1, num_waiting=0, num_free_blocks=50),
        w("d0", num_running=1, num_waiting=0, num_free_blocks=50),
    ]
    assert ids(rank_decode_workers(workers, 10)) == ["d0", "d2", "d1", "d3"]


def test_decode_ranking_puts_a_worker_with_a_long_prompt_queued_behind_busier_ones() -> None:
    per = QUEUED_TOKENS_PER_RANK
    workers = [
        w("long-queue", num_running=1, num_queued_tokens=4 * per, num_free_blocks=50),
        w("queue", num_running=1, num_queued_tokens=per, num_free_blocks=50),
        w("busy", num_running=6, num_queued_tokens=per - 1, num_free_blocks=50),
        w("busier", num_running=7, num_free_blocks=50),
        w("short-queue", num_running=1, num_queued_tokens=40, num_free_blocks=50),
    ]
    # Under one rank of queued tokens the running count decides; then each rank is a step.
    assert ids(rank_decode_workers(workers, 10)) == [
        "short-queue", "busy", "busier", "queue", "long-queue"]
    # Without room, most free blocks first still; equal room ranks by load as above.
    workers[4] = w("short-queue", num_running=1, num_queued_tokens=40, num_free_blocks=5)
    assert ids(rank_decode_workers(workers, 60)) == [
        "busy", "busier", "queue", "long-queue", "short-queue"]


def test_decode_ranking_skips_workers_without_room_then_most_free_blocks() -> None:
    workers = [
        w("idle-but-full", num_running=0, num_free_blocks=3),
        w("busy", num_running=9, num_free_blocks=10),
        w("fuller", num_running=0, num_free_blocks=8),
        w("almost", num_running=1, num_free_blocks=9),
    ]
    # Only "busy" has the 10 blocks; the rest follow by free blocks, most first.
    assert ids(rank_decode_workers(workers, 10)) == ["busy", "almost", "fuller", "idle-but-full"]
    # Nobody fits: most free blocks first.
    assert ids(rank_decode_workers(workers, 11)) == ["busy", "almost", "fuller", "idle-but-full"]
    assert rank_decode_workers([], 1) == []


# ---- conditional disaggregation ----------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt_len", "decode_cached", "has_p", "expected"),
    [
        (32, 0, True, True),  # at the threshold: local
        (33, 0, True, False),  # just above: remote
        (500, 0, False, True),  # no prefill worker: local
        (100, 75, True, True),  # 75% cached on D: local
        (100, 74, True, False),  # 74%: remote
    ],
)
def test_should_prefill_locally(prompt_len: int, decode_cached: int, has_p: bool,
                                expected: bool) -> None:
    assert should_prefill_locally(prompt_len, decode_cached, has_p, 32, 0.75) is expected


def test_plan_route_local_for_short_prompt_and_d_cache() -> None:
    rules = RoutingRules(block_size=BS, local_prefill_threshold=32, local_prefix_fraction=0.75)
    d = w("d0", num_free_blocks=100)
    p = [w("p0"), w("p1")]
    policy = KvAwarePolicy()
    assert plan_route(d, p, 20, {}, rules, policy).prefill is None
    route = plan_route(d, p, 100, {}, rules, policy)
    assert route.prefill is not None and route.prefill.worker_id == "p0"
    assert not route.prefill_locally
    # D holds 5 of the prompt's blocks = 80 of 100 tokens: prefill on D.
    assert plan_route(d, p, 100, {"d0": 5}, rules, policy).prefill_locally
    # 4 blocks = 64 tokens < 75: remote, on the P that holds more of it.
    route = plan_route(d, p, 100, {"d0": 4, "p1": 6}, rules, policy)
    assert route.prefill is not None and route.prefill.worker_id == "p1"


def test_plan_route_never_prefills_on_a_colocated_decode_worker_remotely() -> None:
    rules = RoutingRules(block_size=BS, local_prefill_threshold=0)
    both = w("b0", num_free_blocks=100)
    # The only prefill-capable worker is the decode worker itself: local prefill.
    assert plan_route(both, [both], 100, {}, rules, KvAwarePolicy()).prefill_locally
    route = plan_route(both, [both, w("p9")], 100, {}, rules, KvAwarePolicy())
    assert route.prefill is not None and route.prefill.worker_id == "p9"


# ---- prefill -----------------------------------------------------------------------------


def test_round_robin_cycles_in_id_order() -> None:
    policy = RoundRobinPolicy()
    workers = [w("p2"), w("p0"), w("p1")]
    picks = [policy.pick(workers, 100, {}, BS) for _ in range(5)]
    assert [x.worker_id for x in picks if x] == ["p0", "p1", "p2", "p0", "p1"]
    assert policy.pick([], 100, {}, BS) is None


def test_least_loaded_by_queued_tokens_then_waiting_then_id() -> None:
    policy = LeastLoadedPolicy()
    workers = [
        w("p0", num_queued_tokens=500, num_waiting=0),
        w("p1", num_queued_tokens=100, num_waiting=4),
        w("p2", num_queued_tokens=100, num_waiting=2),
        w("p3", num_queued_tokens=100, num_waiting=2),
    ]
    assert policy.pick(workers, 64, {"p0": 4}, BS) == workers[2]
    assert policy.pick([], 64, {}, BS) is None


def test_kv_aware_cost_is_uncached_prompt_plus_queue() -> None:
    policy = KvAwarePolicy()
    prompt_len = 200
    workers = [
        w("p0", num_queued_tokens=0),  # cost 200
        w("p1", num_queued_tokens=50),  # 10 blocks cached: 200 - 160 + 50 = 90
        w("p2", num_queued_tokens=20),  # 8 blocks cached: 200 - 128 + 20 = 92
    ]
    overlap = {"p1": 10, "p2": 8}
    assert policy.pick(workers, prompt_len, overlap, BS) == workers[1]
    # More queue on p1 flips it: 200 - 160 + 53 = 93 > 92.
    workers[1] = w("p1", num_queued_tokens=53)
    assert policy.pick(workers, prompt_len, overlap, BS) == workers[2]


def test_kv_aware_ties_go_to_least_loaded_then_id() -> None:
    policy = KvAwarePolicy()
    workers = [
        w("p0", num_queued_tokens=64, num_waiting=1),  # 4 blocks cached: 100 - 64 + 64 = 100
        w("p1", num_queued_tokens=0, num_waiting=5),  # nothing cached: 100 - 0 + 0 = 100
        w("p2", num_queued_tokens=64, num_waiting=1),  # same as p0
    ]
    overlap = {"p0": 4, "p2": 4}
    # Equal cost: fewest queued tokens wins.
    assert policy.pick(workers, 100, overlap, BS) == workers[1]
    # p0 and p2 tie on cost and load: the id decides.
    assert policy.pick([workers[2], workers[0]], 100, overlap, BS) == workers[0]


def test_kv_aware_weighs_a_host_tier_hit_between_a_device_hit_and_a_miss() -> None:
    rules = RoutingRules(block_size=BS, host_block_weight=0.75, disk_block_weight=0.5)
    # The same 6 leading blocks of a 100-token prompt: on p0's device, in p1's host tier,
    # on p2's disk, nowhere on p3.
    index = {"p0": PrefixOverlap(device_blocks=6), "p1": PrefixOverlap(host_blocks=6),
             "p2": PrefixOverlap(disk_blocks=6),
             "p4": PrefixOverlap(device_blocks=2, host_blocks=3, disk_blocks=1)}
    weights = weighted_overlap(index, rules)
    assert weights == {"p0": 6.0, "p1": 4.5, "p2": 3.0, "p4": 2 + 2.25 + 0.5}
    policy = KvAwarePolicy()
    workers = [w("p3"), w("p2"), w("p1"), w("p0")]
    order = []
    while workers:  # costs: 100 - 96 = 4, 100 - 72 = 28, 100 - 48 = 52, 100
        pick = policy.pick(workers, 100, weights, BS)
        assert pick is not None
        order.append(pick.worker_id)
        workers.remove(pick)
    assert order == ["p0", "p1", "p2", "p3"]
    # Queued work still counts: with 73 tokens queued p1 costs 28 + 73 = 101 > p3's 100.
    p1_busy = w("p1", num_queued_tokens=73)
    assert policy.pick([p1_busy, w("p3")], 100, weights, BS) == w("p3")
    # Local prefill on D counts its host tier too: 6 host blocks (72 tokens) of 96 reach
    # 0.75 of the prompt; 6 disk blocks (48 tokens) do not.
    d1, d2 = w("p1", num_free_blocks=100), w("p2", num_free_blocks=100)
    assert plan_route(d1, [w("x")], 96, weights, rules, policy).prefill_locally
    assert not plan_route(d2, [w("x")], 96, weights, rules, policy).prefill_locally


def test_make_prefill_policy() -> None:
    assert isinstance(make_prefill_policy("kv_aware"), KvAwarePolicy)
    assert isinstance(make_prefill_policy("round_robin"), RoundRobinPolicy)
    assert isinstance(make_prefill_policy("least_loaded"), LeastLoadedPolicy)
    with pytest.raises(ValueError, match="unknown prefill policy"):
        make_prefill_policy("random")
