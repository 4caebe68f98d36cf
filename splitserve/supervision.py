"""Supervision of a Ray deployment's workers (`splitserve serve`): the driver replaces a
worker actor that can no longer serve.

Every `interval_s` the supervisor asks each worker actor whether its engine failed (a step
raised: the worker already ended its requests as lost, so the router resumed them, and left
the cluster) and notices an actor whose process died (killed, out of memory). Either is
stopped, killed and replaced by a fresh actor of the role it was launched in
(Deployment.add_worker: same engine settings and placement); a replacement that cannot
start now (no room on the cluster) is tried again on the next pass. An actor that does not
answer within `call_timeout_s` is busy, not dead: it is left alone (the router's own health
probes judge a frozen worker). The plain processes of `splitserve prefill|decode` exit with
status 1 instead, for their supervisor (Kubernetes, systemd) to restart.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from splitserve.launcher import Deployment

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode")


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
        self.owed = dict.fromkeys(ROLES, 0)  # removed but not yet replaced (start failed)
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
        for actor, role in self.deployment.workers():
            if self._stop.is_set():
                return
            why = self.problem(actor)
            if why is not None and self.deployment.remove_actor(actor):
                log.warning("a %s worker %s: replacing it", role, why)
                self._stop_actor(actor)
                self.owed[role] += 1
        for role in ROLES:
            while self.owed[role] and not self._stop.is_set():
                try:
                    address = self.deployment.add_worker(role)
                except Exception as exc:  # noqa: BLE001 - tried again on the next pass
                    log.error("starting a %s worker in place of a lost one failed: %s",
                              role, exc)
                    break
                self.owed[role] -= 1
                self.replaced[role] += 1
                log.warning("a new %s worker serves at %s", role, address)

    def problem(self, actor: Any) -> str | None:
        """Why `actor` can no longer serve (None: it can, or it is too busy to say)."""
        import ray

        try:
            failed = ray.get(actor.failed.remote(), timeout=self.call_timeout_s)
        except ray.exceptions.RayActorError as exc:
            return f"died ({type(exc).__name__})"
        except ray.exceptions.GetTimeoutError:
            return None
        return "failed: its engine stopped" if failed else None

    def _stop_actor(self, actor: Any) -> None:
        import ray

        with contextlib.suppress(Exception):  # a dead actor answers nothing
            ray.get(actor.stop.remote(), timeout=self.call_timeout_s)
        ray.kill(actor)
