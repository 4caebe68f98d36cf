"""SLO-aware admission: the TTFT predicted from measured slot hold and first-token times,
and a refusal at once when it exceeds the request's SLO."""

from __future__ import annotations

import asyncio
import time

import pytest

from splitserve.router.admission import AdmissionController
from splitserve.router.slo import SloUnmetError, TtftPredictor
from tests.router.test_admission import settle
from tests.router.test_fairness import run


def test_nothing_is_predicted_or_refused_before_measurements() -> None:
    p = TtftPredictor()
    assert p.predict(10, 4, free_slot=False) is None
    assert p.check(0.001, 10, 4, free_slot=False) is None
    p.observe_first_token(0.2)
    assert p.predict(0, 4, free_slot=True) == pytest.approx(0.2)
    assert p.predict(10, 4, free_slot=False) is None  # no slot hold time yet


def test_the_prediction_follows_queue_depth_and_measured_times() -> None:
    p = TtftPredictor()
    p.observe_first_token(0.2)
    p.observe_hold(2.0)
    # 7 ahead + itself, 4 slots each freeing every 2 s on average: 4 s, then 0.2 s.
    assert p.predict(7, 4, free_slot=False) == pytest.approx(4.2)
    p.observe_hold(4.0)  # EWMA: 0.8 * 2 + 0.2 * 4
    assert p.predict(7, 4, free_slot=False) == pytest.approx(2 * 2.4 + 0.2)
    with pytest.raises(SloUnmetError) as info:
        p.check(2.0, 7, 4, free_slot=False)
    assert info.value.retry_after_s == pytest.approx(3.0)
    assert "exceeds the request's SLO of 2000 ms" in str(info.value)
    assert p.check(10.0, 7, 4, free_slot=False) == pytest.approx(5.0)
    assert p.check(0.01, 0, 4, free_slot=True) == pytest.approx(0.2)  # a free slot: admit


def test_admission_refuses_at_once_what_would_miss_its_slo() -> None:
    async def body() -> None:
        adm = AdmissionController(1, 100)
        adm.predictor.observe_first_token(0.1)
        adm.predictor.observe_hold(1.0)
        assert await adm.acquire("a", ttft_slo_s=0.5) == pytest.approx(0.1)  # free slot
        queued = [asyncio.create_task(adm.acquire("a")) for _ in range(3)]
        await settle()
        started = time.monotonic()
        with pytest.raises(SloUnmetError):  # 3 ahead + itself, 1 s each: 4.1 s > 2 s
            await adm.acquire("a", ttft_slo_s=2.0)
        assert time.monotonic() - started < 0.05
        assert adm.num_queued == 3  # the refused request never queued
        late = asyncio.create_task(adm.acquire("a", ttft_slo_s=10.0))
        await settle()
        assert adm.num_queued == 4
        for _ in range(5):
            adm.release()
            await settle()
        await asyncio.gather(*queued, late)

    run(body())


def test_a_refused_request_leaves_no_trace_in_the_fair_share() -> None:
    async def body() -> None:
        adm = AdmissionController(1, 100)
        adm.predictor.observe_first_token(0.1)
        adm.predictor.observe_hold(1.0)
        await adm.acquire("flood")
        adm.charge("flood", 500)  # the flood has had service; "late" has had none
        queued = [asyncio.create_task(adm.acquire("flood")) for _ in range(5)]
        await settle()
        with pytest.raises(SloUnmetError):
            await adm.acquire("late", ttft_slo_s=0.2)
        assert adm.fair.counter("late") == 0  # not lifted: it never joined the queue
        for _ in range(6):
            adm.release()
            await settle()
        await asyncio.gather(*queued)

    run(body())
