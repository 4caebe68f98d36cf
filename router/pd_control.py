"""Closed-loop P:D control inside the router (RouterConfig.pd_control, `--pd-control`).

Every `period_s` the controller reads what the router already knows: TTFT and TPOT
percentiles over the last `window_s` (RouterMetrics.recent_ttft, and recent_live_tpot or
recent_tpot as `tpot_signal` says), the
live workers and their load reports from cluster state, the admission queue. The pure
`pd_decide.decide` says whether a role is short of capacity long enough to move a worker;
if so the controller asks the least loaded worker of the other role to switch
(WorkerControl.SwitchRole: the worker drains, keeps its process and weights, and
registers in the new role; worker.flip).

The worker registers in the new role at once and finishes its previous role's requests
meanwhile (worker.flip), so the router needs to do nothing around a switch: its view
picks up the new registration within worker_refresh_s. The call returns once the
previous role is drained; decisions wait for it, then the cooldown starts. A worker that
does not serve WorkerControl (started without --flippable) answers UNIMPLEMENTED and is
not asked again; the next candidate is. A failed switch starts the cooldown like a done
one. Run the controller in one router of a deployment (two would both move workers).

Metrics (on the router's registry): splitserve_pd_role_switches_total{direction,result},
splitserve_pd_role_switch_seconds (until the new role serves),
splitserve_pd_role_switch_drain_seconds (the previous role's overlap),
splitserve_pd_workers{role}, splitserve_pd_short_role{role} (1 while judged short),
splitserve_pd_scale_hint{role} (1 while short and no worker can move: add one of this
role), and the signals read (splitserve_pd_signal_ttft_seconds, ..._tpot_seconds).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from prometheus_client import Counter, Gauge, Histogram

from splitserve.cluster.store import LiveWorker, WorkerRole
from splitserve.common.grpc_guard import aio_channel
from splitserve.common.metrics import PREFIX
from splitserve.router.admission import AdmissionController
from splitserve.router.metrics import RouterMetrics
from splitserve.router.pd_decide import (
    DECODE,
    PREFILL,
    Decision,
    Memory,
    PDControlConfig,
    Signals,
    after_switch,
    decide,
)
from splitserve.router.policy import WorkerView
from splitserve.router.state import RouterState
from splitserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

_ROLE = {PREFILL: WorkerRole.PREFILL, DECODE: WorkerRole.DECODE}
_ROLE_PROTO = {PREFILL: common_pb2.WORKER_ROLE_PREFILL, DECODE: common_pb2.WORKER_ROLE_DECODE}
_SWITCH_SLACK_S = 30.0  # the SwitchRole deadline beyond its drain timeout


@dataclass(frozen=True, slots=True)
class Period:
    """One period's record (PDController.history)."""

    at: float  # monotonic
    signals: Signals
    decision: Decision


class PDController:
    def __init__(self, config: PDControlConfig, state: RouterState, metrics: RouterMetrics,
                 admission: AdmissionController,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._state = state
        self._metrics = metrics
        self._admission = admission
        self._clock = clock
        self._memory = Memory()
        self._not_flippable: set[str] = set()  # worker ids that answered UNIMPLEMENTED
        self.history: deque[Period] = deque(maxlen=1000)
        r = metrics.registry
        self.switches = Counter(PREFIX + "pd_role_switches", "Role switches the P:D "
                                "controller asked for, by direction and result.",
                                ["direction", "result"], registry=r)
        for direction in ("prefill_to_decode", "decode_to_prefill"):
            for result in ("done", "failed"):
                self.switches.labels(direction, result)
        buckets = (0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.switch_seconds = Histogram(PREFIX + "pd_role_switch_seconds", "Role switches: "
                                        "from the call to the worker serving in its new role "
                                        "(SwitchRoleResponse.rebuild_ms).", buckets=buckets,
                                        registry=r)
        self.drain_seconds = Histogram(PREFIX + "pd_role_switch_drain_seconds", "Role "
                                       "switches: from serving in the new role until the "
                                       "previous role's requests finished or moved "
                                       "(SwitchRoleResponse.drain_ms; the roles overlap).",
                                       buckets=buckets, registry=r)
        self.workers = Gauge(PREFIX + "pd_workers", "Live workers by role, as the P:D "
                             "controller last read them.", ["role"], registry=r)
        self.short = Gauge(PREFIX + "pd_short_role", "1 while the P:D controller judges "
                           "the role short of capacity.", ["role"], registry=r)
        self.scale_hint = Gauge(PREFIX + "pd_scale_hint", "1 while the role is short and no "
                                "worker can move to it: add a worker of this role.", ["role"],
                                registry=r)
        self.ttft_signal = Gauge(PREFIX + "pd_signal_ttft_seconds", "The TTFT percentile the "
                                 "P:D controller last read (NaN: too few samples).", registry=r)
        self.tpot_signal = Gauge(PREFIX + "pd_signal_tpot_seconds", "The TPOT percentile the "
                                 "P:D controller last read (NaN: too few samples).", registry=r)

    async def run(self) -> None:
        """Decide every period until cancelled; an error costs one period, not the loop."""
        while True:
            await asyncio.sleep(self.config.period_s)
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the store may be down: try next period
                log.warning("P:D control period failed", exc_info=True)

    async def step(self) -> Decision:
        """Read the signals, decide, and switch a worker if the decision says so."""
        live = self._usable(await self._state.store.live_workers())
        signals = self.signals(live)
        decision, self._memory = decide(self.config, self._memory, signals, self._clock())
        self.history.append(Period(self._clock(), signals, decision))
        self._export(signals, decision)
        if decision.action == "switch":
            assert decision.source is not None and decision.target is not None
            await self._switch_one(live, decision.source, decision.target)
            self._memory = after_switch(self._memory, self._clock())
        return decision

    def signals(self, live: list[LiveWorker]) -> Signals:
        cfg = self.config
        ttft, num_ttft = self._metrics.recent_ttft.percentile(cfg.percentile, cfg.window_s)
        tpot_window = (self._metrics.recent_live_tpot if cfg.tpot_signal == "live"
                       else self._metrics.recent_tpot)
        tpot, num_tpot = tpot_window.percentile(cfg.percentile, cfg.window_s)
        prefill = [(i, load) for i, load in live if i.role is WorkerRole.PREFILL]
        return Signals(
            num_prefill=len(prefill),
            num_decode=sum(i.role is WorkerRole.DECODE for i, _ in live),
            ttft_ms=ttft * 1e3 if ttft is not None and num_ttft >= cfg.min_samples else None,
            tpot_ms=tpot * 1e3 if tpot is not None and num_tpot >= cfg.min_samples else None,
            prefill_queued_tokens=sum(load.num_queued_tokens for _, load in prefill if load),
            router_queued=self._admission.num_queued,
        )

    def _usable(self, live: list[LiveWorker]) -> list[LiveWorker]:
        """The live workers serving the router's model with its block size."""
        model, block_size = self._state.model.model_id, self._state.config.block_size
        return [(info, load) for info, load in live
                if (not info.model or info.model == model) and info.block_size == block_size]

    def _export(self, s: Signals, decision: Decision) -> None:
        for role in (PREFILL, DECODE):
            self.workers.labels(role).set(s.count(role))
            self.short.labels(role).set(float(decision.short == role))
            self.scale_hint.labels(role).set(float(decision.action == "blocked"
                                                   and decision.short == role))
        self.ttft_signal.set(float("nan") if s.ttft_ms is None else s.ttft_ms / 1e3)
        self.tpot_signal.set(float("nan") if s.tpot_ms is None else s.tpot_ms / 1e3)

    async def _switch_one(self, live: list[LiveWorker], source: str, target: str) -> None:
        """Ask the least loaded flippable worker of `source` to play `target`."""
        candidates = [(info, load) for info, load in live if info.role is _ROLE[source]
                      and info.worker_id not in self._not_flippable]
        if source == DECODE:
            candidates.sort(key=lambda w: ((w[1].num_running + w[1].num_waiting) if w[1]
                                           else 0, w[0].worker_id))
        else:
            candidates.sort(key=lambda w: ((w[1].num_queued_tokens, w[1].num_waiting) if w[1]
                                           else (0, 0), w[0].worker_id))
        for info, _ in candidates:
            if await self.switch(WorkerView(info.worker_id, info.address), target) is not None:
                return
        log.warning("P:D control: no %s worker can switch to %s (none started --flippable)",
                    source, target)

    async def switch(self, worker: WorkerView, target: str) -> bool | None:
        """SwitchRole on `worker`: True done, False failed, None not flippable."""
        direction = f"{_other(target)}_to_{target}"
        started = self._clock()
        channel = aio_channel(worker.address, self._state.config.resolved_cluster_token)
        try:
            stub = worker_pb2_grpc.WorkerControlStub(channel)
            response = await stub.SwitchRole(
                worker_pb2.SwitchRoleRequest(
                    target_role=_ROLE_PROTO[target],
                    drain_timeout_ms=int(self.config.drain_timeout_s * 1000)),
                timeout=self.config.drain_timeout_s + _SWITCH_SLACK_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                self._not_flippable.add(worker.worker_id)
                return None
            self.switches.labels(direction, "failed").inc()
            log.warning("P:D control: %s could not switch to %s: %s: %s", worker.worker_id,
                        target, exc.code().name, exc.details())
            return False
        finally:
            await channel.close()
        elapsed = self._clock() - started
        self.switches.labels(direction, "done").inc()
        self.switch_seconds.observe(response.rebuild_ms / 1e3)
        self.drain_seconds.observe(response.drain_ms / 1e3)
        log.info("P:D control: %s switched %s: serving in %.0f ms, previous role drained in "
                 "%.0f ms (%d requests aborted; %.2f s in all)", worker.worker_id, direction,
                 response.rebuild_ms, response.drain_ms, response.num_aborted_requests,
                 elapsed)
        return True


def _other(role: str) -> str:
    return DECODE if role == PREFILL else PREFILL
