"""Adding workers of the role the router's P:D control finds short (`splitserve serve
--max-prefill-workers N --max-decode-workers N`): the Ray launcher acting on the scale hint
the router exports (on Kubernetes an external scaler would have to read it).

The router's controller (router.pd_control) moves capacity by flipping a worker to the
other role. When it cannot (the other role is at its floor, or no worker there is
flippable) it exports splitserve_pd_scale_hint{role} = 1. The Autoscaler, a thread of the
`splitserve serve` driver, reads the router's /metrics every period_s and runs a
ScaleDecider:
- a hint held for hold_s adds one worker of that role (Deployment.add_worker), unless the
  role is at its maximum, counted live as the router counts it
  (splitserve_pd_workers{role}: a worker the controller switched counts in its new role);
- after an addition it decides nothing for cooldown_s. The new worker loads its weights
  first, and the router's latency window still holds the time before it served.
- A hint that drops restarts its hold.

Workers are only added here. Removing one is a drain (`Deployment.remove_worker`), and the
controller names no role with capacity to spare, so that is left to the operator.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client.parser import text_string_to_metric_families

from splitserve.common.metrics import PREFIX

log = logging.getLogger(__name__)

HINT_METRIC = PREFIX + "pd_scale_hint"
WORKERS_METRIC = PREFIX + "pd_workers"
ROLES = ("prefill", "decode")


def _by_role(text: str, metric: str) -> dict[str, float]:
    """role -> the value of `metric`{role} in a Prometheus text exposition (absent roles
    and NaN values left out)."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != metric:
            continue
        for sample in family.samples:
            role = sample.labels.get("role")
            if role in ROLES and not math.isnan(sample.value):
                values[role] = sample.value
    return values


def parse_scale_hints(text: str) -> dict[str, bool]:
    """role -> whether the router asks for a worker of it, from a Prometheus text
    exposition (roles the router does not export are absent)."""
    return {role: value >= 1.0 for role, value in _by_role(text, HINT_METRIC).items()}


def parse_worker_counts(text: str) -> dict[str, int]:
    """role -> live workers as the router's P:D control last counted them (a flipped
    worker counts in its new role)."""
    return {role: int(value) for role, value in _by_role(text, WORKERS_METRIC).items()}


@dataclass(frozen=True)
class ScalePolicy:
    max_workers: Mapping[str, int] = field(default_factory=dict)  # role -> most (absent: 0)
    hold_s: float = 30.0  # a hint must hold this long before a worker is added
    cooldown_s: float = 120.0  # no decision for this long after an addition
    period_s: float = 5.0  # how often the Autoscaler reads the router

    def __post_init__(self) -> None:
        if self.hold_s < 0 or self.cooldown_s < 0 or self.period_s <= 0:
            raise ValueError("hold_s and cooldown_s must be >= 0 and period_s > 0")
        unknown = set(self.max_workers) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown roles {sorted(unknown)}; roles are {ROLES}")


class ScaleDecider:
    """Hysteresis over the hints: which role to add a worker to now, if any."""

    def __init__(self, policy: ScalePolicy) -> None:
        self.policy = policy
        self._since: dict[str, float] = {}  # role -> when its current hint began
        self._quiet_until = -math.inf

    def decide(self, now: float, hints: Mapping[str, bool], counts: Mapping[str, int]
               ) -> str | None:
        for role in ROLES:
            if hints.get(role):
                self._since.setdefault(role, now)
            else:
                self._since.pop(role, None)
        if now < self._quiet_until:
            return None
        held = sorted((since, role) for role, since in self._since.items()
                      if now - since >= self.policy.hold_s
                      and counts.get(role, 0) < self.policy.max_workers.get(role, 0))
        if not held:
            return None
        role = held[0][1]  # the longest-held hint first
        del self._since[role]
        self._quiet_until = now + self.policy.cooldown_s
        return role


class Scalable(Protocol):
    def counts(self) -> dict[str, int]: ...

    def add_worker(self, role: str) -> str: ...


def metrics_reader(http_address: str, token: str | None = None,
                   timeout_s: float = 5.0) -> Callable[[], str]:
    """A callable returning the router's /metrics text (http_address is host:port)."""
    request = urllib.request.Request(f"http://{http_address}/metrics")
    if token:
        request.add_header("Authorization", f"Bearer {token}")

    def read() -> str:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return str(response.read().decode())

    return read


class Autoscaler:
    """The driver's thread: read the hints, decide, add a worker."""

    def __init__(self, deployment: Scalable, read_metrics: Callable[[], str],
                 policy: ScalePolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self._deployment = deployment
        self._read = read_metrics
        self._decider = ScaleDecider(policy)
        self._clock = clock
        self._period_s = policy.period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="autoscaler", daemon=True)
        self._failing = False
        self.added: list[str] = []  # roles of the workers added, in order

    def start(self) -> Autoscaler:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def step(self) -> str | None:
        """One read and decision; the role of the worker added, if one was."""
        try:
            text = self._read()
            hints = parse_scale_hints(text)
            live = parse_worker_counts(text)
        except Exception as exc:  # noqa: BLE001 - the router may be busy or restarting
            if not self._failing:
                log.warning("autoscaler: cannot read the router's metrics: %s", exc)
            self._failing = True
            return None
        if self._failing:
            log.info("autoscaler: reading the router's metrics again")
            self._failing = False
        # Live counts as the router sees them (workers switch roles); what this driver
        # launched for a role the router does not count yet.
        counts = {**self._deployment.counts(), **live}
        role = self._decider.decide(self._clock(), hints, counts)
        if role is None:
            return None
        log.warning("autoscaler: the router's P:D control asks for a %s worker; adding one",
                    role)
        address = self._deployment.add_worker(role)
        self.added.append(role)
        log.warning("autoscaler: %s worker added at %s", role, address)
        return role

    def _loop(self) -> None:
        while not self._stop.wait(self._period_s):
            try:
                self.step()
            except Exception:  # noqa: BLE001 - a failed addition: log, keep watching
                log.exception("autoscaler: adding a worker failed")
