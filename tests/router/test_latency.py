"""Latency-aware routing (router/latency.py): exact predictions and picks."""

from __future__ import annotations

import random
import statistics

import pytest

from splitserve.common.step_time import StepTimeModel
from splitserve.router.latency import (
    best_routes,
    candidate_routes,
    expected_e2e_ms,
    order_routes,
    pooled_step_model,
    predict_route,
)
from splitserve.router.policy import Route, WorkerView

FAST = StepTimeModel(base_ms=2.0, per_seq_ms=1.0, per_prompt_token_ms=0.1, token_budget=100)
SLOW = StepTimeModel(base_ms=2.0, per_seq_ms=1.0, per_prompt_token_ms=0.4, token_budget=100)


def worker(wid: str, model: StepTimeModel | None = FAST, running: int = 0,
           queued: int = 0, free: int = 100) -> WorkerView:
    return WorkerView(wid, num_running=running, num_queued_tokens=queued, num_free_blocks=free,
                      num_total_blocks=100, step_model=model)


def test_local_prefill_prediction() -> None:
    d = worker("d0", running=4, queued=50)
    p = predict_route(Route(d, None), 150, {}, 16)
    assert p is not None
    # 200 prompt tokens ahead: 2 chunks, each with 5 sequences (4 + the prompt's own).
    assert p.ttft_ms == pytest.approx(2 * (2.0 + 5.0) + 20.0)
    # One decode step of 5 sequences with the budget's worth of those prompt tokens.
    assert p.tpot_ms == pytest.approx(2.0 + 5.0 + 0.1 * 100)


def test_remote_prefill_prediction_and_prefix_cache() -> None:
    d = worker("d0", running=4)
    p = worker("p0", model=SLOW, queued=64)
    got = predict_route(Route(d, p), 100, {"p0": 2.0}, 16)  # 32 tokens cached on p0
    assert got is not None
    # 64 queued + the 68 uncached: 132 tokens, 2 chunks on p0's own (slow) model.
    assert got.ttft_ms == pytest.approx(2 * (2.0 + 1.0) + 0.4 * 132)
    # The decode worker only decodes it: one step of 5 sequences, nothing queued there.
    assert got.tpot_ms == pytest.approx(2.0 + 5.0)


def test_unknown_step_times_give_no_prediction() -> None:
    assert predict_route(Route(worker("d0", model=None), None), 10, {}, 16) is None
    assert predict_route(Route(worker("d0"), worker("p0", model=None)), 10, {}, 16) is None
    assert best_routes([worker("d0")], [worker("p0", model=None)], 10, {}, 16) is None


def test_candidates_are_local_and_every_other_prefill_worker() -> None:
    d, p0, p1 = worker("d0"), worker("p0"), worker("p1")
    assert candidate_routes(d, [p0, d, p1], local_only=False) == [
        Route(d, None), Route(d, p0), Route(d, p1)]
    assert candidate_routes(d, [p0], local_only=True) == [Route(d, None)]


def test_a_busy_decode_worker_sends_long_prompts_to_an_idle_prefill_worker() -> None:
    d = worker("d0", running=16, queued=400)
    p = worker("p0", model=SLOW)
    [best] = best_routes([d], [p], 300, {}, 16) or []
    assert best.route == Route(d, p)
    # An idle decode worker with a fast engine prefills a short prompt itself.
    idle = worker("d1")
    [best] = best_routes([idle], [p], 20, {}, 16) or []
    assert best.route == Route(idle, None)


def test_decode_workers_ordered_by_ttft_then_tpot() -> None:
    p = worker("p0", model=SLOW)
    busy, quiet = worker("d0", running=30, queued=300), worker("d1", running=2)
    ranked = best_routes([busy, quiet], [p], 500, {}, 16)
    assert ranked is not None
    assert [r.route.decode.worker_id for r in ranked] == ["d1", "d0"]
    # Same prefill worker for both (same TTFT): the decode batch decides (TPOT).
    a, b = worker("d0", model=SLOW, running=8), worker("d1", model=SLOW, running=1)
    ranked = best_routes([a, b], [worker("p0", model=FAST)], 500, {}, 16)
    assert ranked is not None
    assert [(r.route.decode.worker_id, r.route.prefill.worker_id if r.route.prefill else "")
            for r in ranked] == [("d1", "p0"), ("d0", "p0")]
    assert ranked[0].ttft_ms == ranked[1].ttft_ms and ranked[0].tpot_ms < ranked[1].tpot_ms


def test_expected_e2e_charges_a_busy_worker_for_every_decode_step() -> None:
    """Two colocated workers whose online fits differ a little: ranked by TTFT the one
    that looks faster per prompt token wins however busy it is (it took 26-30 of 30
    requests in the measured sweep); by expected end-to-end time the idle one wins once
    its decode steps outweigh the prompt's difference."""
    slightly_faster = StepTimeModel(base_ms=26.0, per_seq_ms=1.0, per_prompt_token_ms=2.0,
                                    token_budget=2048)
    slightly_slower = StepTimeModel(base_ms=26.0, per_seq_ms=1.0, per_prompt_token_ms=2.2,
                                    token_budget=2048)
    busy = worker("d0", model=slightly_faster, running=6)
    idle = worker("d1", model=slightly_slower, running=0)
    ranked = best_routes([busy, idle], [], 64, {}, 16)
    assert ranked is not None and [p.route.decode.worker_id for p in ranked] == ["d0", "d1"]
    by_busy, by_idle = ranked
    # TTFT: 26 + 7 x 1 + 64 x 2.0 = 161 ms busy, 26 + 1 + 64 x 2.2 = 167.8 ms idle.
    assert (by_busy.ttft_ms, by_idle.ttft_ms) == pytest.approx((161.0, 167.8))
    # + 95 decode steps: of 7 sequences (33 ms) busy, of 1 (27 ms) idle.
    assert expected_e2e_ms(by_busy, 96) == pytest.approx(161.0 + 95 * 33.0)
    assert expected_e2e_ms(by_idle, 96) == pytest.approx(167.8 + 95 * 27.0)
    assert expected_e2e_ms(by_idle, 96) < expected_e2e_ms(by_busy, 96)
    assert expected_e2e_ms(by_busy, 1) < expected_e2e_ms(by_idle, 1)  # one token: TTFT decides


def test_a_stale_fit_does_not_keep_an_idle_worker_idle() -> None:
    """An idle worker whose fit came from a few early steps (slow) against a busy one:
    by its own fits the busy one looks better however much it runs; with the decode steps
    timed by the candidates' pooled fit the idle one wins."""
    fresh = StepTimeModel(base_ms=26.0, per_seq_ms=1.0, per_prompt_token_ms=2.0,
                          token_budget=2048)
    stale = StepTimeModel(base_ms=40.0, per_seq_ms=1.0, per_prompt_token_ms=2.3,
                          token_budget=2048)
    busy, idle = worker("d0", model=fresh, running=5), worker("d1", model=stale)
    ranked = best_routes([busy, idle], [], 64, {}, 16)
    assert ranked is not None
    by_id = {p.route.decode.worker_id: p for p in ranked}
    own = {wid: expected_e2e_ms(p, 96) for wid, p in by_id.items()}
    assert own["d0"] < own["d1"]  # 26 + 6 = 32 ms a step busy, 41 idle: busy wins
    pooled = pooled_step_model([fresh, stale, None])
    assert pooled == StepTimeModel(33.0, 1.0, 2.15, 2048)
    shared = {wid: expected_e2e_ms(p, 96, pooled) for wid, p in by_id.items()}
    # TTFT by its own fits (160 vs 188.2 ms), decode steps by the pool's: 39 vs 34 ms.
    assert shared["d0"] == pytest.approx(160.0 + 95 * 39.0)
    assert shared["d1"] == pytest.approx(188.2 + 95 * 34.0)
    assert shared["d1"] < shared["d0"]
    assert pooled_step_model([None]) is None


def test_order_routes_room_then_slo_then_expected_e2e() -> None:
    """The order dispatch tries decode workers in (and bench route's first pick): room for
    the request, then the TTFT SLO, then expected end-to-end time with the pooled fit."""
    fastest_but_full = worker("d0", free=3)
    late = worker("d1", running=0, queued=5000)  # 5,000 prompt tokens ahead: a late TTFT
    busy = worker("d2", running=30)
    idle = worker("d3", running=0)
    ranked = best_routes([fastest_but_full, late, busy, idle], [], 64, {}, 16)
    assert ranked is not None
    # TTFT: d3 2 + 1 + 6.4 = 9.4 ms; d2 2 + 31 + 6.4 = 39.4 ms; d1 51 chunks of 3 ms +
    # 506.4 = 659.4 ms. End to end over 96 tokens (95 steps of the pooled FAST fit, the
    # request in the batch): d3 9.4 + 95 x 3 = 294.4; d2 39.4 + 95 x 33 = 3174.4; d1 944.4.
    order = order_routes(ranked, num_blocks=10, max_tokens=96, waited_s=0.0, ttft_slo_s=0.2)
    assert [p.route.decode.worker_id for p in order] == ["d3", "d2", "d1", "d0"]  # d1 late
    no_slo = order_routes(ranked, num_blocks=10, max_tokens=96)
    assert [p.route.decode.worker_id for p in no_slo] == ["d3", "d1", "d2", "d0"]
    # The time already waited counts against the SLO: after 0.19 s only d3 meets 0.2 s.
    waited = order_routes(ranked, num_blocks=10, max_tokens=96, waited_s=0.19, ttft_slo_s=0.2)
    assert [p.route.decode.worker_id for p in waited] == ["d3", "d1", "d2", "d0"]
    # One token: TTFT alone decides among the workers with room.
    one = order_routes(ranked, num_blocks=10, max_tokens=1)
    assert [p.route.decode.worker_id for p in one] == ["d3", "d2", "d1", "d0"]


def test_pooled_fit_of_an_even_count_is_the_mean_of_the_middle_two() -> None:
    fits = [StepTimeModel(float(b), 1.0, 0.5, budget)
            for b, budget in ((10, 100), (40, 300), (20, 200), (30, 201))]
    assert pooled_step_model(fits) == StepTimeModel(25.0, 1.0, 0.5, 200)  # int(200.5)


def test_pooled_fit_is_statistics_median_field_by_field() -> None:
    rng = random.Random(5)
    for count in range(1, 9):
        fits = [StepTimeModel(rng.uniform(1, 9), rng.uniform(0, 1), rng.uniform(0, 0.1),
                              rng.randrange(1, 4096)) for _ in range(count)]
        assert pooled_step_model(fits) == StepTimeModel(
            statistics.median(m.base_ms for m in fits),
            statistics.median(m.per_seq_ms for m in fits),
            statistics.median(m.per_prompt_token_ms for m in fits),
            int(statistics.median(m.token_budget for m in fits)))
