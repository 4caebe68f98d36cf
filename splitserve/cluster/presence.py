"""A worker's presence in the cluster store: registration, heartbeats, prefix events.

One background thread per worker heartbeats every ttl/3 with the worker's current load and
publishes its prefix-cache events (block hashes stored / evicted, per KV tier). If the store forgot the
worker (it missed its TTL, or the store restarted) it registers again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from splitserve.cluster.store import ClusterStore, WorkerInfo, WorkerLoadReport

log = logging.getLogger(__name__)

LoadFn = Callable[[], WorkerLoadReport]
EventsFn = Callable[[], tuple[list[int], list[int]]]
TierEventsFn = Callable[[], dict[str, tuple[list[int], list[int]]]]


class WorkerPresence:
    def __init__(
        self,
        store: ClusterStore,
        info: WorkerInfo,
        load_fn: LoadFn,
        events_fn: EventsFn,
        ttl_s: float = 3.0,
        tier_events_fn: TierEventsFn | None = None,
    ):
        self.store = store
        self.info = info
        self._load_fn = load_fn
        self._events_fn = events_fn
        self._tier_events_fn = tier_events_fn  # the KV tiers' events ("host", "disk")
        self.ttl_s = ttl_s
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"presence-{info.worker_id}", daemon=True
        )

    def start(self) -> None:
        self.store.register_worker(self.info, self.ttl_s)
        self._thread.start()

    def beat(self) -> None:
        """One heartbeat (also called by the thread); re-registers when forgotten."""
        if not self.store.heartbeat(self.info.worker_id, self._load_fn(), self.ttl_s):
            log.warning("worker %s was not live in the store; registering again",
                        self.info.worker_id)
            self.store.register_worker(self.info, self.ttl_s)
            self.store.heartbeat(self.info.worker_id, self._load_fn(), self.ttl_s)
        stored, evicted = self._events_fn()
        if stored or evicted:
            self.store.publish_prefix_events(self.info.worker_id, stored, evicted)
        tiers = self._tier_events_fn() if self._tier_events_fn is not None else {}
        for tier, (stored, evicted) in tiers.items():
            if stored or evicted:
                self.store.publish_prefix_events(self.info.worker_id, stored, evicted, tier)

    def _run(self) -> None:
        interval = self.ttl_s / 3
        while not self._stop.wait(interval):
            try:
                self.beat()
            except Exception as exc:  # the store may be briefly unreachable; keep trying
                log.warning("heartbeat of %s failed: %s", self.info.worker_id, exc)

    def stop(self, deregister: bool = True) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.ttl_s)
        if deregister:
            try:
                self.store.deregister_worker(self.info.worker_id)
            except Exception as exc:
                log.warning("deregistering %s failed: %s", self.info.worker_id, exc)
