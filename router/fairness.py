"""Who goes next when the router's admission queue holds several requests: priority classes
with aging, and, within a class, fair share across clients by virtual token counters (VTC,
Sheng et al., "Fairness in Serving Large Language Models", OSDI 2024).

- **Clients** are the names of API keys (common.auth; "anonymous" without keys).
- **Counters.** Each client has a counter of the service it received, in weighted tokens:
  `(input_weight * prompt tokens + output_weight * output tokens) / client weight`. Prompt
  tokens are charged when a request is admitted, output tokens as they stream.
- **Fair share.** Among the waiters of the best class, the one whose client has the least
  service goes next (oldest first within a client). A backlogged client's counter only
  grows when it is served, so a flooding client cannot starve a light one: over any period
  where both are backlogged their service differs by a bounded amount.
- **No banked credit.** A client that joins the queue (none of its requests waiting) is lifted
  to the least counter of the clients already waiting, or, when none is, to the counter of
  the last client served: being idle earns nothing.
- **Several routers** share the counters through cluster state (ClusterStore.add_service,
  Redis or the router's embedded store): each router adds what it counted and adopts the
  totals about twice a second, so fairness holds across routers too.
- **Priorities.** A request's `priority` is an integer class, lower first (vLLM's
  convention; default 0). A waiting request's class improves by one every `aging_s` it
  waits, up to the best class waiting (where fair share then decides), so a low class is
  delayed, never starved, and old requests never overtake the fair order of their class.

`policy="fcfs"` keeps priorities and aging but ignores counters (first come, first served
within a class): the baseline the fairness benchmark compares against.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

POLICIES = ("vtc", "fcfs")


@dataclass(frozen=True)
class FairShareConfig:
    policy: str = "vtc"
    input_weight: float = 1.0
    output_weight: float = 2.0  # an output token costs a decode step: VTC's own choice
    client_weights: Mapping[str, float] | None = None  # name -> share (default 1)
    aging_s: float = 10.0  # a waiter's class improves by one per this many seconds; 0: never

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"admission policy must be one of {', '.join(POLICIES)}, "
                             f"got {self.policy!r}")
        for name, value in (("input_weight", self.input_weight),
                            ("output_weight", self.output_weight)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        for client, weight in (self.client_weights or {}).items():
            if not (math.isfinite(weight) and weight > 0):
                raise ValueError(f"the weight of client {client!r} must be > 0, got {weight}")
        if not (math.isfinite(self.aging_s) and self.aging_s >= 0):
            raise ValueError(f"aging_s must be a finite number >= 0, got {self.aging_s}")


def parse_client_weights(text: str) -> dict[str, float]:
    """`alice=2,bob=0.5` -> {"alice": 2.0, "bob": 0.5}; ValueError with a message."""
    weights: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, eq, value = item.partition("=")
        if not eq or not name.strip():
            raise ValueError(f"client weight {item!r}: expected name=weight")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"client weight {item!r}: {value!r} is not a number") from None
    return weights


@dataclass(eq=False)
class Waiter:
    """One queued request, as the chooser sees it."""

    client: str
    priority: int
    since: float  # clock() when it was queued
    seq: int  # arrival order, for ties


class FairShare:
    """Service counters and the choice of the next waiter (event-loop thread only)."""

    def __init__(self, config: FairShareConfig | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or FairShareConfig()
        self._weights = dict(self.config.client_weights or {})
        self._clock = clock
        self.counters: dict[str, float] = {}
        self._last_served = 0.0  # the counter of the client last picked
        self._pending: dict[str, float] = {}  # counted here since the last sync()

    def now(self) -> float:
        return self._clock()

    def counter(self, client: str) -> float:
        return self.counters.get(client, 0.0)

    def charge(self, client: str, prompt_tokens: int = 0, output_tokens: int = 0) -> None:
        """Count service given to `client`."""
        cost = (self.config.input_weight * prompt_tokens
                + self.config.output_weight * output_tokens)
        if cost:
            self._add(client, cost / self._weights.get(client, 1.0))

    def _add(self, client: str, amount: float) -> None:
        self.counters[client] = self.counter(client) + amount
        self._pending[client] = self._pending.get(client, 0.0) + amount

    def counter_on_joining(self, client: str, waiting: Iterable[Waiter]) -> float:
        """`client`'s counter once it joins the queue (see `joined`); changes nothing."""
        others = [self.counter(w.client) for w in waiting if w.client != client]
        floor = min(others) if others else self._last_served
        return max(self.counter(client), floor)

    def joined(self, client: str, waiting: Iterable[Waiter]) -> None:
        """`client` queues a request while none of its own is waiting: no banked credit."""
        lifted = self.counter_on_joining(client, waiting)
        if lifted > self.counter(client):
            self._add(client, lifted - self.counter(client))  # shared like any service

    def take_pending(self) -> dict[str, float]:
        """What this router counted since the last call, for the shared totals."""
        pending, self._pending = self._pending, {}
        return pending

    def merge(self, totals: Mapping[str, float],
              unsent: Mapping[str, float] | None = None) -> None:
        """Adopt the deployment's totals (every router's service, ours included), plus what
        was counted here since they were read; `unsent` goes back into the pending set (a
        failed sync)."""
        for client, amount in (unsent or {}).items():
            self._pending[client] = self._pending.get(client, 0.0) + amount
        for client, total in totals.items():
            self.counters[client] = total + self._pending.get(client, 0.0)

    def class_of(self, waiter: Waiter, now: float, best: int) -> float:
        """The waiter's class now (lower goes first): its own, improved by one per aging_s
        waited, but never past `best`, the best class waiting. Aging lifts a class up to
        the best one, where fair share decides; it never lets the oldest requests of one
        class overtake the fair order within it."""
        aging = self.config.aging_s
        aged = waiter.priority - ((now - waiter.since) // aging if aging > 0 else 0.0)
        return max(float(best), aged)

    def pick(self, waiting: Iterable[Waiter]) -> Waiter | None:
        """The waiter that goes next: best class, then least-served client, then oldest."""
        waiters = list(waiting)
        if not waiters:
            return None
        now = self.now()
        top = min(w.priority for w in waiters)
        fair = self.config.policy == "vtc"
        best: Waiter | None = None
        best_key: tuple[float, float, int] | None = None
        for waiter in waiters:
            key = (self.class_of(waiter, now, top),
                   self.counter(waiter.client) if fair else 0.0, waiter.seq)
            if best_key is None or key < best_key:
                best, best_key = waiter, key
        if best is not None:
            self._last_served = self.counter(best.client)
        return best
