"""Supervision of a Ray deployment's workers (`splitserve serve`): the driver replaces a
worker actor that can no longer serve.

Every `interval_s` the supervisor asks every worker actor at once whether its engine failed
(a step raised: the worker already ended its requests as lost, so the router resumed them,
and left the cluster) and notices an actor whose process died (killed, out of memory).
Either is stopped, killed and replaced by a fresh actor of the role it was launched in
(Deployment.add_worker: same engine settings and placement, the role's next worker id). A
replacement that cannot start now (no room on the cluster) is tried again on a later
pass; replacements of a role that keep failing are spaced out (doubling from 1 s to 60 s,
reset after a quiet 5 minutes), so an engine that fails at once does not reload the model
in a loop. An actor that does not answer within `call_timeout_s` is busy, not dead, and one
Ray calls temporarily unavailable (a network blip) is asked again next pass: both are left
alone (the router's own health probes judge a frozen worker); a question still unanswered
is not asked again. The plain processes of `splitserve prefill|decode` exit with status 1
instead, for their supervisor (Kubernetes, systemd) to restart.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from splitserve.launcher import Deployment

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode")
_BACKOFF_FIRST_S = 1.0
_BACKOFF_MAX_S = 60.0
_BACKOFF_RESET_S = 300.0  # a role without a replacement this long starts from the first


class WorkerSupervisor:
    """Watches `deployment`'s worker actors from a thread of the driver (start/stop)."""

    def __init__(self, deployment: Deployment, interval_s: float = 2.0,
                 call_timeout_s: float = 10.0) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.deployment = deployment
        self.interval_s = interval_s
        self.call_timeout_s = call_timeout_s
        self.replaced = dict.fromkeys(ROLES, 0)  # workers replaced, by launch role
        self.owed = dict.fromkeys(ROLES, 0)  # removed but not yet replaced
        self._backoff = dict.fromkeys(ROLES, 0.0)  # the wait after the last replacement
        self._not_before = dict.fromkeys(ROLES, 0.0)  # monotonic time
        self._last_replaced = dict.fromkeys(ROLES, -_BACKOFF_RESET_S)
        self._asked: dict[int, Any] = {}  # id(actor) -> its unanswered failed() call
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-supervisor",
                                        daemon=True)

    def start(self) -> WorkerSupervisor:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the next pass tries again
                log.exception("supervising the workers failed")

    def check(self) -> None:
        """One pass: replace each worker that failed or died, and start those owed."""
        workers = self.deployment.workers()
        for (actor, role), why in zip(workers, self.problems([a for a, _ in workers]),
                                      strict=True):
            if self._stop.is_set():
                return
            if why is not None and self.deployment.remove_actor(actor):
                log.warning("a %s worker %s: replacing it", role, why)
                self._stop_actor(actor)
                self.owed[role] += 1
        for role in ROLES:
            while self.owed[role] and not self._stop.is_set():
                if time.monotonic() < self._not_before[role]:
                    break  # spaced out: a later pass
                self._space_out(role)
                try:
                    address = self.deployment.add_worker(role)
                except Exception as exc:  # noqa: BLE001 - tried again on a later pass
                    log.error("starting a %s worker in place of a lost one failed: %s",
                              role, exc)
                    break
                self.owed[role] -= 1
                self.replaced[role] += 1
                log.warning("a new %s worker serves at %s", role, address)

    def _space_out(self, role: str) -> None:
        """A replacement of `role` starts now: the next one waits 1 s, then 2 s, ... up to
        60 s, unless this one stays quiet for _BACKOFF_RESET_S."""
        now = time.monotonic()
        quiet = now - self._last_replaced[role] > _BACKOFF_RESET_S
        self._backoff[role] = (_BACKOFF_FIRST_S if quiet
                               else min(_BACKOFF_MAX_S, 2 * self._backoff[role]))
        self._last_replaced[role] = now
        self._not_before[role] = now + self._backoff[role]

    def problems(self, actors: list[Any]) -> list[str | None]:
        """Per actor, why it can no longer serve (None: it can, or cannot say now). Every
        actor is asked at once and answers within one `call_timeout_s`."""
        import ray

        if not actors:
            return []
        refs = []
        for actor in actors:
            ref = self._asked.get(id(actor))
            if ref is None:
                ref = self._asked[id(actor)] = actor.failed.remote()
            refs.append(ref)
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.call_timeout_s)
        answered = set(ready)
        out: list[str | None] = []
        for actor, ref in zip(actors, refs, strict=True):
            if ref not in answered:
                out.append(None)  # busy: asked again once it answers
                continue
            del self._asked[id(actor)]
            try:
                failed = ray.get(ref)
            except ray.exceptions.ActorUnavailableError:
                out.append(None)  # may come back: asked again next pass
                continue
            except ray.exceptions.RayActorError as exc:
                out.append(f"died ({type(exc).__name__})")
                continue
            out.append("failed: its engine stopped" if failed else None)
        return out

    def _stop_actor(self, actor: Any) -> None:
        import ray

        self._asked.pop(id(actor), None)
        with contextlib.suppress(Exception):  # a dead actor answers nothing
            ray.get(actor.stop.remote(), timeout=self.call_timeout_s)
        ray.kill(actor)
