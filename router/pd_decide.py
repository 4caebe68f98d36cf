"""The P:D controller's decision, as a pure function (router.pd_control runs it).

Every period the controller reads the signals (TTFT and TPOT percentiles over a sliding
window, prompt tokens queued on the prefill workers, the P and D counts) and asks `decide`
whether to move a worker from one role to the other. The TPOT signal is, by default
(`tpot_signal="finished"`), the finished requests' whole TPOTs, which lag a long request's
life behind the decode load of now; "live" reads the decoding requests' token gaps of the
last second or so instead (RouterMetrics.recent_live_tpot). In `splitserve bench
pd-control` (BENCHMARKS.md) live switched earlier in three of three pairs but its goodput
was not better in all of them, hence not the default.

- A role is *short* when its objective is missed while the other role has room to give a
  worker: TTFT over its objective (or the prefill queue over `prefill_queue_tokens` per
  prefill worker) with TPOT under `headroom` x its objective makes prefill short; TPOT
  over its objective with TTFT under `headroom` x its objective makes decode short. Both
  missed, or neither: nothing to move (when both are missed more workers would help).
  The donor's latency is not scaled up for its smaller pool: a decode step's time grows
  far less than linearly with its batch, so a linear projection refused every switch
  that helped in `splitserve bench pd-control`.
- Hysteresis: the same role must be short for `consecutive` periods in a row; after a
  switch (done or failed) nothing moves for `cooldown_s`, and the streak starts over.
  The headroom band keeps a switch from creating the opposite shortage at once.
- Never below `min_prefill` / `min_decode` workers of a role (at least one each): a short
  role whose donor is at its minimum is `blocked`, the signal for adding a worker of the
  short role (an autoscaler reads it from the router's metrics).

Times are seconds on the caller's monotonic clock; latencies are milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PREFILL, DECODE = "prefill", "decode"
TPOT_SIGNALS = ("live", "finished")
_OTHER = {PREFILL: DECODE, DECODE: PREFILL}


@dataclass(frozen=True)
class PDControlConfig:
    """Objectives and hysteresis of the P:D controller (RouterConfig.pd_control)."""

    ttft_slo_ms: float = 2000.0
    tpot_slo_ms: float = 100.0
    percentile: float = 90.0  # of the window's TTFT and TPOT samples
    # TPOT samples: "live" (each decoding request's recent token gaps, RouterMetrics.
    # recent_live_tpot) or "finished" (each finished request's whole TPOT, recent_tpot).
    tpot_signal: str = "finished"
    period_s: float = 2.0  # signals read and a decision taken this often
    window_s: float = 10.0  # latency samples of the last window_s seconds count
    min_samples: int = 4  # fewer in the window: that latency is unknown
    consecutive: int = 3  # periods in a row a role must be short before a switch
    cooldown_s: float = 20.0  # after a switch ends (or fails), none for this long
    headroom: float = 0.8  # the donor role's latency must be under this x its objective
    # Prompt tokens queued per prefill worker that make prefill short by themselves (they
    # show a backlog before the TTFTs it causes are measured); 0: latency only.
    prefill_queue_tokens: int = 0
    min_prefill: int = 1
    min_decode: int = 1
    drain_timeout_s: float = 30.0  # SwitchRoleRequest.drain_timeout_ms

    def __post_init__(self) -> None:
        for name in ("ttft_slo_ms", "tpot_slo_ms", "period_s", "window_s", "drain_timeout_s"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        if self.tpot_signal not in TPOT_SIGNALS:
            raise ValueError(f"tpot_signal must be one of {TPOT_SIGNALS}, "
                             f"got {self.tpot_signal!r}")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        if not 0 < self.headroom <= 1:
            raise ValueError(f"headroom must be in (0, 1], got {self.headroom}")
        if not (math.isfinite(self.cooldown_s) and self.cooldown_s >= 0):
            raise ValueError(f"cooldown_s must be >= 0, got {self.cooldown_s}")
        if self.min_samples < 1 or self.consecutive < 1 or self.prefill_queue_tokens < 0:
            raise ValueError("min_samples and consecutive must be >= 1, "
                             "prefill_queue_tokens >= 0")
        if self.min_prefill < 1 or self.min_decode < 1:
            raise ValueError("min_prefill and min_decode must be >= 1: a role never empties")

    def minimum(self, role: str) -> int:
        return self.min_prefill if role == PREFILL else self.min_decode


@dataclass(frozen=True, slots=True)
class Signals:
    """What the controller saw in one period."""

    num_prefill: int
    num_decode: int
    ttft_ms: float | None = None  # the percentile over the window; None: too few samples
    tpot_ms: float | None = None
    prefill_queued_tokens: int = 0  # summed over the prefill workers
    router_queued: int = 0  # requests waiting for an admission slot (reported, not used)

    def count(self, role: str) -> int:
        return self.num_prefill if role == PREFILL else self.num_decode


@dataclass(frozen=True, slots=True)
class Memory:
    """What carries over from one period to the next."""

    short: str | None = None  # the role found short last period
    streak: int = 0  # periods in a row it was
    last_switch_at: float = -math.inf  # when the last switch ended (or failed)


@dataclass(frozen=True, slots=True)
class Decision:
    action: str  # hold | cooldown | blocked | switch
    short: str | None = None  # the role short of capacity this period (None: neither)
    source: str | None = None  # switch: the role that gives a worker ...
    target: str | None = None  # ... and the one that gets it
    reason: str = ""


def short_role(cfg: PDControlConfig, s: Signals) -> str | None:
    """The role short of capacity while the other has room to give (see module)."""
    ttft_over = s.ttft_ms is not None and s.ttft_ms > cfg.ttft_slo_ms
    if cfg.prefill_queue_tokens and s.num_prefill:
        ttft_over = ttft_over or s.prefill_queued_tokens / s.num_prefill > cfg.prefill_queue_tokens
    tpot_over = s.tpot_ms is not None and s.tpot_ms > cfg.tpot_slo_ms
    ttft_room = not ttft_over and (s.ttft_ms or 0.0) <= cfg.headroom * cfg.ttft_slo_ms
    tpot_room = not tpot_over and (s.tpot_ms or 0.0) <= cfg.headroom * cfg.tpot_slo_ms
    if ttft_over and tpot_room:
        return PREFILL
    if tpot_over and ttft_room:
        return DECODE
    return None


def decide(cfg: PDControlConfig, memory: Memory, s: Signals, now: float
           ) -> tuple[Decision, Memory]:
    """This period's decision and the memory for the next one."""
    short = short_role(cfg, s)
    if now - memory.last_switch_at < cfg.cooldown_s:
        left = cfg.cooldown_s - (now - memory.last_switch_at)
        return (Decision("cooldown", short, reason=f"{left:.1f} s of cooldown left"),
                Memory(None, 0, memory.last_switch_at))
    streak = memory.streak + 1 if short is not None and short == memory.short else int(
        short is not None)
    memory = Memory(short, streak, memory.last_switch_at)
    if short is None:
        return Decision("hold", reason="no role short of capacity with the other to spare"), memory
    if streak < cfg.consecutive:
        return Decision("hold", short, reason=f"{short} short for {streak} of "
                        f"{cfg.consecutive} periods"), memory
    source = _OTHER[short]
    if s.count(source) <= cfg.minimum(source):
        return Decision("blocked", short, reason=f"{short} short but {source} is at its "
                        f"minimum of {cfg.minimum(source)}"), memory
    return Decision("switch", short, source, short, reason=f"{short} short for {streak} "
                    f"periods (ttft {s.ttft_ms} ms, tpot {s.tpot_ms} ms)"), memory


def after_switch(memory: Memory, now: float) -> Memory:
    """The memory once a switch ended or failed at `now`: cooldown from here, no streak."""
    return Memory(None, 0, now)
