"""The P:D controller's decision (router.pd_decide): which role is short, hysteresis over
consecutive periods, the cooldown after a switch, and the per-role minimums."""

from __future__ import annotations

import pytest

from splitserve.router.latency_window import LatencyWindow
from splitserve.router.pd_decide import (
    DECODE,
    PREFILL,
    Memory,
    PDControlConfig,
    Signals,
    after_switch,
    decide,
    short_role,
)

CFG = PDControlConfig(ttft_slo_ms=1000, tpot_slo_ms=100, consecutive=3, cooldown_s=20,
                      headroom=0.8)
TTFT_HOT = Signals(num_prefill=1, num_decode=2, ttft_ms=1500, tpot_ms=30)  # prefill short
TPOT_HOT = Signals(num_prefill=2, num_decode=1, ttft_ms=200, tpot_ms=150)  # decode short
CALM = Signals(num_prefill=1, num_decode=2, ttft_ms=400, tpot_ms=40)
FRESH = Memory()


def run(signals: list[Signals], cfg: PDControlConfig = CFG, memory: Memory = FRESH,
        start: float = 100.0, period: float = 1.0) -> tuple[list[str], Memory]:
    """Feed one Signals per period; the actions, and the memory after the last."""
    actions = []
    for i, s in enumerate(signals):
        decision, memory = decide(cfg, memory, s, start + i * period)
        actions.append(decision.action)
    return actions, memory


def test_short_role_needs_the_other_roles_headroom() -> None:
    assert short_role(CFG, TTFT_HOT) == PREFILL
    assert short_role(CFG, TPOT_HOT) == DECODE
    assert short_role(CFG, CALM) is None
    # Both objectives missed: moving a worker cannot help.
    assert short_role(CFG, Signals(1, 2, ttft_ms=1500, tpot_ms=150)) is None
    # The donor must be under 0.8 x its objective: in the band between, no room to give.
    assert short_role(CFG, Signals(1, 2, ttft_ms=1500, tpot_ms=85)) is None
    assert short_role(CFG, Signals(1, 2, ttft_ms=1500, tpot_ms=80)) == PREFILL
    assert short_role(CFG, Signals(2, 1, ttft_ms=900, tpot_ms=150)) is None
    assert short_role(CFG, Signals(2, 1, ttft_ms=800, tpot_ms=150)) == DECODE


def test_unknown_latencies_are_no_evidence() -> None:
    assert short_role(CFG, Signals(1, 2)) is None
    # TTFT over and no TPOT samples (one-token outputs): decode has room.
    assert short_role(CFG, Signals(1, 2, ttft_ms=1500)) == PREFILL
    assert short_role(CFG, Signals(2, 1, tpot_ms=150)) == DECODE


def test_prefill_queue_makes_prefill_short_before_ttft_shows_it() -> None:
    cfg = PDControlConfig(ttft_slo_ms=1000, tpot_slo_ms=100, prefill_queue_tokens=2000)
    queued = Signals(1, 2, ttft_ms=None, tpot_ms=30, prefill_queued_tokens=2500)
    assert short_role(cfg, queued) == PREFILL
    assert short_role(CFG, queued) is None  # the queue signal is off by default
    assert short_role(cfg, Signals(2, 2, tpot_ms=30, prefill_queued_tokens=2500)) is None


def test_switch_only_after_consecutive_periods() -> None:
    actions, memory = run([TTFT_HOT, TTFT_HOT, TTFT_HOT])
    assert actions == ["hold", "hold", "switch"]
    assert memory.short == PREFILL and memory.streak == 3
    decision, _ = decide(CFG, Memory(), TTFT_HOT, 0.0)
    assert (decision.short, decision.source, decision.target) == (PREFILL, None, None)
    decision, _ = decide(CFG, Memory(PREFILL, 2), TTFT_HOT, 0.0)
    assert (decision.action, decision.source, decision.target) == ("switch", DECODE, PREFILL)


def test_an_interrupted_streak_starts_over() -> None:
    actions, _ = run([TTFT_HOT, TTFT_HOT, CALM, TTFT_HOT, TTFT_HOT, TTFT_HOT])
    assert actions == ["hold", "hold", "hold", "hold", "hold", "switch"]
    # The other role being short also breaks the streak.
    flip_flop = [TTFT_HOT, TPOT_HOT, TTFT_HOT, TPOT_HOT, TTFT_HOT, TPOT_HOT]
    actions, memory = run(flip_flop)
    assert actions == ["hold"] * 6 and memory.streak == 1


def test_cooldown_after_a_switch() -> None:
    _, memory = run([TTFT_HOT] * 3)
    memory = after_switch(memory, now=200.0)
    assert memory == Memory(None, 0, 200.0)
    # 20 s of cooldown: nothing moves and no streak builds, however short a role is.
    actions, memory = run([TPOT_HOT] * 20, memory=memory, start=200.0)
    assert actions == ["cooldown"] * 20 and memory.streak == 0
    # From 220 s on, a new streak is needed.
    actions, _ = run([TPOT_HOT] * 3, memory=memory, start=220.0)
    assert actions == ["hold", "hold", "switch"]


def test_never_below_the_minimum_of_a_role() -> None:
    one_decode = Signals(num_prefill=2, num_decode=1, ttft_ms=1500, tpot_ms=20)
    actions, memory = run([one_decode] * 4)
    assert actions == ["hold", "hold", "blocked", "blocked"]
    decision, _ = decide(CFG, memory, one_decode, 500.0)
    assert decision.short == PREFILL and "decode is at its minimum of 1" in decision.reason
    one_prefill = Signals(num_prefill=1, num_decode=2, ttft_ms=100, tpot_ms=150)
    assert run([one_prefill] * 3)[0] == ["hold", "hold", "blocked"]
    cfg = PDControlConfig(ttft_slo_ms=1000, tpot_slo_ms=100, min_decode=2)
    assert run([TTFT_HOT] * 3, cfg=cfg)[0] == ["hold", "hold", "blocked"]
    with pytest.raises(ValueError, match="never empties"):
        PDControlConfig(min_prefill=0)


def test_config_validation() -> None:
    for bad in ({"ttft_slo_ms": 0}, {"period_s": float("inf")}, {"percentile": 0},
                {"headroom": 1.5}, {"cooldown_s": -1}, {"consecutive": 0},
                {"tpot_signal": "recent"}):
        with pytest.raises(ValueError):
            PDControlConfig(**bad)  # type: ignore[arg-type]


def test_latency_window_percentiles_over_the_last_seconds() -> None:
    window = LatencyWindow(horizon_s=60.0)
    for i in range(10):
        window.add(float(i), now=100.0 + i)  # value i at time 100 + i
    assert window.percentile(90, window_s=100, now=109.0) == (8.0, 10)
    assert window.percentile(50, window_s=3, now=109.0) == (7.0, 4)  # 6, 7, 8, 9
    assert window.percentile(100, window_s=0.5, now=109.0) == (9.0, 1)
    assert window.percentile(90, window_s=1, now=200.0) == (None, 0)
    window.add(1.0, now=200.0)  # the horizon drops samples older than 140 s
    assert window.values(1000, now=200.0) == [1.0]
