"""The router's live TPOT samples (RouterMetrics.recent_live_tpot): each decoding request
adds the mean gap between its tokens over each stretch of LIVE_TPOT_SEGMENT_S, and one
for the stretch it finished in; the P:D controller reads them or the finished requests'
whole TPOTs, as its config says."""

from __future__ import annotations

import pytest

from splitserve.router import metrics as metrics_module
from splitserve.router.admission import AdmissionController
from splitserve.router.metrics import LIVE_TPOT_SEGMENT_S, RouterMetrics
from splitserve.router.pd_control import PDController
from splitserve.router.pd_decide import PDControlConfig
from splitserve.router.relay import RequestTrace
from splitserve.v1 import common_pb2, router_pb2


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(metrics_module.time, "monotonic", fake)
    return fake


def _tokens(n: int) -> router_pb2.GenerateResponse:
    return router_pb2.GenerateResponse(token_ids=list(range(n)))


def _finish(n: int = 0) -> router_pb2.GenerateResponse:
    return router_pb2.GenerateResponse(token_ids=list(range(n)),
                                       finish_reason=common_pb2.FINISH_REASON_LENGTH)


def _values(window_metrics: RouterMetrics, which: str) -> list[float]:
    return [round(v, 6) for v in getattr(window_metrics, which).values(1e6)]


def test_a_sample_per_stretch_and_one_for_the_last(clock: FakeClock) -> None:
    assert LIVE_TPOT_SEGMENT_S == 1.0
    metrics = RouterMetrics()
    observer = metrics.observer(RequestTrace(arrival=clock.now))
    clock.now += 0.5
    observer.chunk(_tokens(1))  # the first token: no gap yet
    for _ in range(8):  # 8 tokens 0.125 s apart: a stretch of 1.0 s
        clock.now += 0.125
        observer.chunk(_tokens(1))
    assert _values(metrics, "recent_live_tpot") == [0.125]
    for _ in range(3):  # the next stretch: 2 tokens per chunk, chunks 0.375 s apart
        clock.now += 0.375
        observer.chunk(_tokens(2))
    assert _values(metrics, "recent_live_tpot") == [0.125, 0.1875]  # 1.125 s / 6 tokens
    clock.now += 0.5
    observer.chunk(_finish(1))  # finished 0.5 s into a stretch: its one token counts
    assert _values(metrics, "recent_live_tpot") == [0.125, 0.1875, 0.5]
    # The finished request's TPOT is its whole decode: 2.625 s over 15 tokens after the first.
    assert _values(metrics, "recent_tpot") == [0.175]


def test_a_request_decoding_now_is_seen_before_it_finishes(clock: FakeClock) -> None:
    metrics = RouterMetrics()
    slow = metrics.observer(RequestTrace(arrival=clock.now))
    slow.chunk(_tokens(1))
    for _ in range(30):  # 0.25 s per token for 7.5 s, still running
        clock.now += 0.25
        slow.chunk(_tokens(1))
    live = metrics.recent_live_tpot.percentile(90, window_s=5.0)
    assert live == (0.25, 5)  # one sample per 1.0 s stretch of the last 5 s
    assert metrics.recent_tpot.percentile(90, window_s=5.0) == (None, 0)


def test_no_sample_without_a_second_token(clock: FakeClock) -> None:
    metrics = RouterMetrics()
    observer = metrics.observer(RequestTrace(arrival=clock.now))
    clock.now += 2.0
    observer.chunk(_finish(1))  # one token, no gap between tokens
    other = metrics.observer(RequestTrace(arrival=clock.now))
    clock.now += 2.0
    other.chunk(_finish(3))  # three tokens in one chunk: no time between them measured
    assert _values(metrics, "recent_live_tpot") == []


@pytest.mark.parametrize("signal, expected_ms", [("live", 300.0), ("finished", 40.0)])
def test_the_controller_reads_the_configured_tpot_window(signal: str,
                                                         expected_ms: float) -> None:
    metrics = RouterMetrics()
    for _ in range(5):
        metrics.recent_live_tpot.add(0.3)
        metrics.recent_tpot.add(0.04)
    config = PDControlConfig(tpot_signal=signal, min_samples=5)
    controller = PDController(config, state=None,  # type: ignore[arg-type] # signals() reads none
                              metrics=metrics, admission=AdmissionController(4, 4))
    assert controller.signals([]).tpot_ms == pytest.approx(expected_ms)
