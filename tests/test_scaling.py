"""splitserve.scaling: the scale hints read from a Prometheus exposition, the hysteresis
that turns them into additions, and the Autoscaler's step. The deployment here is a
stand-in recording additions; tests/service/test_service_ray.py adds workers to a real
Ray deployment."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from splitserve.scaling import (
    HINT_METRIC,
    Autoscaler,
    ScaleDecider,
    ScalePolicy,
    parse_scale_hints,
    parse_worker_counts,
)


def _exposition(prefill: float | None, decode: float | None,
                workers: dict[str, int] | None = None) -> str:
    """The router's /metrics text with the P:D controller's hint and worker gauges (as
    pd_control registers them) and an unrelated metric."""
    registry = CollectorRegistry()
    hint = Gauge(HINT_METRIC, "1 while the role is short and no worker can move to it.",
                 ["role"], registry=registry)
    other = Gauge("splitserve_pd_short_role", "short", ["role"], registry=registry)
    other.labels("decode").set(1.0)
    live = Gauge("splitserve_pd_workers", "Live workers by role.", ["role"], registry=registry)
    for role, count in (workers or {}).items():
        live.labels(role).set(count)
    for role, value in (("prefill", prefill), ("decode", decode)):
        if value is not None:
            hint.labels(role).set(value)
    return generate_latest(registry).decode()


def test_parse_scale_hints() -> None:
    assert parse_scale_hints(_exposition(0.0, 1.0)) == {"prefill": False, "decode": True}
    assert parse_scale_hints(_exposition(None, 0.0)) == {"decode": False}
    assert parse_scale_hints(_exposition(float("nan"), None)) == {}
    assert parse_scale_hints("") == {}
    text = _exposition(0.0, 1.0, {"prefill": 2, "decode": 1})
    assert parse_worker_counts(text) == {"prefill": 2, "decode": 1}
    assert parse_worker_counts(_exposition(0.0, 1.0)) == {}


def test_a_hint_must_hold_before_a_worker_is_added() -> None:
    decider = ScaleDecider(ScalePolicy({"decode": 3, "prefill": 1}, hold_s=10, cooldown_s=60))
    counts = {"prefill": 1, "decode": 1}
    assert decider.decide(0.0, {"decode": True}, counts) is None
    assert decider.decide(9.9, {"decode": True}, counts) is None
    assert decider.decide(10.0, {"decode": True}, counts) == "decode"
    # Cooldown: nothing until 70 s; the hold starts again at the first reading after the
    # addition (here 69 s), so the next worker comes at 79 s.
    assert decider.decide(69.0, {"decode": True}, counts) is None
    assert decider.decide(70.0, {"decode": True}, counts) is None
    assert decider.decide(79.0, {"decode": True}, counts) == "decode"


def test_a_dropped_hint_restarts_its_hold() -> None:
    decider = ScaleDecider(ScalePolicy({"decode": 3}, hold_s=10, cooldown_s=0))
    counts = {"decode": 1}
    assert decider.decide(0.0, {"decode": True}, counts) is None
    assert decider.decide(5.0, {"decode": False}, counts) is None
    assert decider.decide(12.0, {"decode": True}, counts) is None  # held 0 s, not 12
    assert decider.decide(22.0, {"decode": True}, counts) == "decode"


def test_no_worker_beyond_the_maximum_and_none_for_a_role_without_one() -> None:
    decider = ScaleDecider(ScalePolicy({"decode": 2}, hold_s=0, cooldown_s=0))
    assert decider.decide(0.0, {"decode": True, "prefill": True},
                          {"decode": 2, "prefill": 1}) is None
    assert decider.decide(1.0, {"decode": True}, {"decode": 1, "prefill": 1}) == "decode"


def test_the_longest_held_hint_goes_first() -> None:
    decider = ScaleDecider(ScalePolicy({"decode": 4, "prefill": 4}, hold_s=5, cooldown_s=0))
    counts = {"decode": 1, "prefill": 1}
    decider.decide(0.0, {"prefill": True}, counts)
    decider.decide(2.0, {"prefill": True, "decode": True}, counts)
    assert decider.decide(7.0, {"prefill": True, "decode": True}, counts) == "prefill"
    assert decider.decide(7.0, {"prefill": True, "decode": True}, counts) == "decode"


def test_bad_policies_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown roles"):
        ScalePolicy({"router": 2})
    with pytest.raises(ValueError, match="period_s"):
        ScalePolicy({"decode": 2}, period_s=0)


class _Deployment:
    def __init__(self) -> None:
        self.workers = {"prefill": 1, "decode": 1}

    def counts(self) -> dict[str, int]:
        return dict(self.workers)

    def add_worker(self, role: str) -> str:
        self.workers[role] += 1
        return f"127.0.0.1:{5000 + self.workers[role]}"


def test_autoscaler_adds_the_hinted_role_up_to_its_maximum() -> None:
    deployment, now = _Deployment(), [0.0]
    texts = [_exposition(0.0, 1.0)]
    scaler = Autoscaler(deployment, lambda: texts[0],
                        ScalePolicy({"decode": 2, "prefill": 1}, hold_s=3, cooldown_s=10),
                        clock=lambda: now[0])
    steps = []
    for t in range(0, 30):
        now[0] = float(t)
        steps.append(scaler.step())
    assert steps.count("decode") == 1 and steps.index("decode") == 3
    assert deployment.workers == {"prefill": 1, "decode": 2} and scaler.added == ["decode"]


def test_autoscaler_counts_workers_as_the_router_does() -> None:
    """Launched as 1 prefill + 1 decode; the P:D control then switched the prefill worker
    to decode, so the router counts 0 + 2. Decode is at its maximum of 2 by that live
    count (one worker only was launched as decode): nothing is added."""
    deployment, now = _Deployment(), [0.0]
    text = _exposition(0.0, 1.0, {"prefill": 0, "decode": 2})
    scaler = Autoscaler(deployment, lambda: text, ScalePolicy({"decode": 2}, hold_s=0),
                        clock=lambda: now[0])
    assert scaler.step() is None and deployment.workers == {"prefill": 1, "decode": 1}


def test_autoscaler_survives_an_unreadable_router() -> None:
    def unreachable() -> str:
        raise ConnectionRefusedError("router restarting")

    scaler = Autoscaler(_Deployment(), unreachable, ScalePolicy({"decode": 2}, hold_s=0))
    assert scaler.step() is None and scaler.step() is None


def test_serve_flags_make_the_policy() -> None:
    from splitserve.cli import _scale_policy, build_parser

    def policy(*flags: str) -> ScalePolicy | None:
        return _scale_policy(build_parser().parse_args(["serve", *flags]))  # type: ignore[no-any-return]

    assert policy() is None
    got = policy("--pd-control", "--decode-workers", "2", "--max-decode-workers", "4",
                 "--scale-hold", "5", "--scale-cooldown", "20")
    assert got is not None
    assert dict(got.max_workers) == {"prefill": 1, "decode": 4}
    assert (got.hold_s, got.cooldown_s) == (5.0, 20.0)
    with pytest.raises(SystemExit, match="need --pd-control"):
        policy("--max-prefill-workers", "3")
    with pytest.raises(SystemExit, match="below --decode-workers"):
        policy("--pd-control", "--decode-workers", "2", "--max-decode-workers", "1")
    with pytest.raises(SystemExit, match="must be >= 0"):
        policy("--pd-control", "--max-decode-workers", "2", "--scale-hold", "-1")
