"""A worker that switches between the prefill and decode roles at runtime (role flipping).

`FlippableWorker` keeps one WorkerCore (worker.core) for the life of the process: the
engine on its loop thread (model weights, KV pool, step-time fit), the KV backend, the
cluster store, the gRPC server and the metrics server. On it plays one role at a time, a
PrefillWorker or a DecodeWorker built on that core (the role classes are handed in: this
layer sits below them), and during a switch also the role it is leaving. The server
serves both role services and WorkerControl; a role service's calls go to the role that
plays it (new or leaving), the other's get UNAVAILABLE.

Life cycle of a switch (WorkerControl.SwitchRole, `switch_role`):
1. Refused while another is in progress (ABORTED), and when no other live worker of the
   model plays the current role (FAILED_PRECONDITION; `allow_last` overrides).
2. The current role leaves the cluster (deregisters) but keeps its requests, and the
   prefix cache is emptied of unreferenced blocks (the new registration starts with an
   empty prefix set, as a restarted worker's does).
3. The other role's object is built on the same core and registers. Nothing is
   reloaded: the same engine, weights and KV pool, worker id, address, KV endpoint and
   started_at. From here the worker serves in the new role (`rebuild_ms`).
4. Overlap: the leaving role keeps taking the work routers with an older view still send
   it for its `switch_grace_s` (a prefill role: a refused Prefill costs the request a
   resume and the address an ejection), then drains: no new work; a decode role hands
   its running requests to the other decode workers with their KV (live migration, as on
   SIGTERM), a prefill role finishes its prompts. Both roles' requests share the engine's
   batches meanwhile, as in a colocated worker. Bounded by the drain timeout, after which
   what is left is aborted (a decode role hands it back for recompute) (`drain_ms`).
5. The leaving role is released (its hooks on the engine unset) and its service closed.
If 3 fails, the old role registers again and the switch fails (INTERNAL).
A switch that waited for its drain before serving the new role took 30 s in `splitserve
bench pd-control`: a decode worker moving to prefill holds requests whose prompts wait in
the very prefill queue the switch is meant to shorten.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import grpc

from splitserve.cluster.store import ClusterStore
from splitserve.common.grpc_util import ServiceError
from splitserve.common.metrics import WorkerStatsSnapshot, worker_registry
from splitserve.engine.engine_loop import EngineStopped
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.model_files import model_name
from splitserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from splitserve.worker.core import (
    CONTROL_SERVICE,
    ROLE_PROTO,
    ROLE_SERVICES,
    ROLES,
    WorkerCore,
    WorkerOptions,
)
from splitserve.worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)

# A role class: PrefillWorker or DecodeWorker, called as cls(options, store, core).
RoleClass = Callable[[WorkerOptions, ClusterStore | None, WorkerCore], WorkerRuntime]
DEFAULT_DRAIN_TIMEOUT_S = 30.0
_ROLE_FROM_PROTO = {v: k for k, v in ROLE_PROTO.items()}


@dataclass(frozen=True, slots=True)
class SwitchResult:
    previous_role: str
    role: str
    switched: bool  # False: it already played that role
    drain_ms: float = 0.0  # serving in the new role -> the previous role's work done
    rebuild_ms: float = 0.0  # the call -> serving in the new role
    num_aborted: int = 0  # requests left when the drain ran out of time


@dataclass(frozen=True, slots=True)
class _Switch:
    source: str
    target: str
    started_at: float  # monotonic


class _Handlers:
    """Stands in for a grpc.Server while a role adds its servicer; keeps its handlers."""

    def __init__(self) -> None:
        self.generic: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        """(The generic handlers cover the same methods.)"""

    def lookup(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        for handler in self.generic:
            found = handler.service(details)
            if found is not None:
                return found
        return None


@dataclass(frozen=True, slots=True)
class _Playing:
    worker: WorkerRuntime
    handlers: _Handlers


class _RoleRouter(grpc.GenericRpcHandler):
    """Routes a role service's calls to the role that plays it (the new one, or the one a
    switch is leaving); refuses the other's."""

    def __init__(self, owner: FlippableWorker) -> None:
        self._owner = owner

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        service = details.method.rpartition("/")[0].lstrip("/")
        if service not in ROLE_SERVICES.values():
            return None
        # `leaving` is set before `playing` changes and cleared after: read in this order.
        playing, leaving = self._owner.playing, self._owner.leaving
        for role in (playing, leaving):
            if role is not None and service == ROLE_SERVICES[role.worker.role]:
                return role.handlers.lookup(details)
        message = (f"worker {playing.worker.worker_id} plays the {playing.worker.role} role "
                   f"now; {service} is not served")

        def refuse(request: bytes, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAVAILABLE, message)

        return grpc.unary_unary_rpc_method_handler(refuse)


class _ControlServicer(worker_pb2_grpc.WorkerControlServicer):
    def __init__(self, owner: FlippableWorker) -> None:
        self._owner = owner

    def SwitchRole(self, request: worker_pb2.SwitchRoleRequest,
                   context: grpc.ServicerContext) -> worker_pb2.SwitchRoleResponse:
        owner = self._owner
        target = _ROLE_FROM_PROTO.get(request.target_role, "")  # "": INVALID_ARGUMENT
        timeout_s = request.drain_timeout_ms / 1000.0 or DEFAULT_DRAIN_TIMEOUT_S
        try:
            result = owner.switch_role(target, timeout_s, request.allow_last_of_role)
        except ServiceError as exc:
            context.abort(exc.code, exc.message)
        return worker_pb2.SwitchRoleResponse(
            worker_id=owner.worker_id, previous_role=ROLE_PROTO[result.previous_role],
            role=ROLE_PROTO[result.role], switched=result.switched, drain_ms=result.drain_ms,
            rebuild_ms=result.rebuild_ms, num_aborted_requests=result.num_aborted,
        )


class FlippableWorker:
    """A worker process whose role can be switched at runtime; see the module docstring."""

    def __init__(self, options: WorkerOptions, roles: Mapping[str, RoleClass], role: str,
                 store: ClusterStore | None = None) -> None:
        if set(roles) != set(ROLES) or role not in roles:
            raise ValueError(f"roles must map {sorted(ROLES)} to their classes and role be "
                             f"one of them, got {sorted(roles)} and {role!r}")
        self.options = options
        self._roles = roles
        self.core = WorkerCore(options, options.worker_id or f"flip-{uuid.uuid4().hex[:8]}",
                               store)
        self._lock = threading.Lock()
        self._switch: _Switch | None = None
        self.num_switches = 0
        self.playing = self._build(role)
        self.leaving: _Playing | None = None  # the role a switch is leaving
        server = self.core.server
        server.add_generic_rpc_handlers((_RoleRouter(self),))
        worker_pb2_grpc.add_WorkerControlServicer_to_server(_ControlServicer(self), server)
        self.core.bind([*ROLE_SERVICES.values(), CONTROL_SERVICE])
        self._mark_health()
        self.metrics_registry = worker_registry(self)

    # ---- what a plain worker offers (the CLI, the launcher, metrics) ----------------------
    @property
    def worker(self) -> WorkerRuntime:
        """The role object playing now."""
        return self.playing.worker

    @property
    def role(self) -> str:
        return self.playing.worker.role

    @property
    def worker_id(self) -> str:
        return self.core.worker_id

    @property
    def address(self) -> str:
        return self.core.address

    @property
    def metrics_port(self) -> int | None:
        return self.core.metrics_port

    @property
    def failed(self) -> threading.Event:
        """Set once the engine failed (the role playing then ended its requests)."""
        return self.core.failed

    def load_proto(self) -> common_pb2.WorkerLoad:
        return self.worker.load_proto()

    def metrics_snapshot(self) -> WorkerStatsSnapshot:
        return self.worker.metrics_snapshot()

    def start(self) -> FlippableWorker:
        if self.options.metrics_port is not None:
            self.core.serve_metrics(self.metrics_registry, self.options.metrics_port)
        self.core.start()
        self.worker.start()
        return self

    def drain(self, wait_timeout_s: float = 0.0, migrate: bool = False) -> int:
        return self.worker.drain(wait_timeout_s, migrate)

    def stop(self, grace_s: float = 1.0) -> None:
        leaving = self.leaving
        if leaving is not None:
            leaving.worker.release()
        self.worker.release()
        self.core.stop(grace_s)

    # ---- switching -------------------------------------------------------------------------
    def switch_role(self, target: str, drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
                    allow_last: bool = False) -> SwitchResult:
        """Play `target` from now on (see the module docstring); ServiceError if refused."""
        if target not in self._roles:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"target role must be one of {sorted(self._roles)}, got "
                               f"{target or 'none'!r}")
        if self.core.failed.is_set():
            raise ServiceError(grpc.StatusCode.UNAVAILABLE,
                               f"worker {self.worker_id}'s engine failed: it plays no role")
        with self._lock:
            busy = self._switch
            if busy is not None:
                raise ServiceError(
                    grpc.StatusCode.ABORTED,
                    f"worker {self.worker_id} is already switching role ({busy.source} -> "
                    f"{busy.target}, for {time.monotonic() - busy.started_at:.1f} s); "
                    "retry when it is done")
            current = self.worker
            if current.role == target:
                return SwitchResult(target, target, switched=False)
            if not allow_last:
                self._check_not_last(current.role)
            self._switch = _Switch(current.role, target, time.monotonic())
        try:
            return self._switch_now(current, target, drain_timeout_s)
        except EngineStopped as exc:  # the engine failed during the switch
            raise ServiceError(grpc.StatusCode.UNAVAILABLE,
                               f"worker {self.worker_id}'s engine failed while switching "
                               f"to {target}: {exc}") from exc
        finally:
            with self._lock:
                self._switch = None

    def _check_not_last(self, role: str) -> None:
        try:
            live = self.core.store.live_workers()
        except Exception as exc:  # noqa: BLE001 - unknown: do not risk leaving none
            raise ServiceError(grpc.StatusCode.UNAVAILABLE,
                               f"cluster state unreachable, cannot check the {role} workers "
                               f"left: {exc}") from exc
        model = model_name(self.options.engine.model)
        others = [info for info, _ in live if info.worker_id != self.worker_id
                  and info.model == model and info.block_size == self.core.engine.block_size
                  and info.role.can_serve(ROLES[role])]
        if not others:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"worker {self.worker_id} is the last live {role} worker of {model}: "
                "switching it would leave none (allow_last_of_role overrides)")

    def _switch_now(self, current: WorkerRuntime, target: str,
                    drain_timeout_s: float) -> SwitchResult:
        started = time.monotonic()
        current.leave_cluster()
        self.core.loop.call(_reset_prefix_cache)
        self.core.loop.drain_prefix_events()  # (the new registration starts empty)
        self.core.loop.drain_tier_events()
        leaving = self.playing
        self.leaving = leaving
        try:
            self.playing = self._build(target)
            self._mark_health()
            self.playing.worker.start()
        except Exception as exc:
            log.exception("worker %s failed to start as %s; back to %s", self.worker_id,
                          target, current.role)
            self.playing, self.leaving = leaving, None
            self._mark_health()
            current.start()
            raise ServiceError(grpc.StatusCode.INTERNAL,
                               f"switching {self.worker_id} to {target} failed ({exc}); it "
                               f"plays {current.role} again") from exc
        serving = time.monotonic()
        time.sleep(current.switch_grace_s)
        left = current.drain(drain_timeout_s, migrate=True)
        aborted = current.abort_in_flight() if left else 0
        current.release()
        self.leaving = None
        self._mark_health()
        done = time.monotonic()
        self.num_switches += 1
        result = SwitchResult(current.role, target, True, (done - serving) * 1000.0,
                              (serving - started) * 1000.0, aborted)
        log.info("worker %s switched %s -> %s: serving in %.1f ms, previous role drained in "
                 "%.0f ms (%d aborted)", self.worker_id, current.role, target,
                 result.rebuild_ms, result.drain_ms, aborted)
        return result

    def _build(self, role: str) -> _Playing:
        worker = self._roles[role](self.options, None, self.core)
        handlers = _Handlers()
        worker.register_servicer(cast(grpc.Server, handlers))
        return _Playing(worker, handlers)

    def _mark_health(self) -> None:
        health = self.core.health
        if health is not None and self.core.failed.is_set():
            health.set_not_serving()  # (a switch that ran on as the engine failed)
        elif health is not None:
            served = {ROLE_SERVICES[p.worker.role] for p in (self.playing, self.leaving)
                      if p is not None}
            health.set_serving(sorted(served))
            health.set_not_serving(sorted(set(ROLE_SERVICES.values()) - served))


def _reset_prefix_cache(engine: LLMEngine) -> None:
    """Forget the cached blocks no request holds (the new role registers with none)."""
    engine.block_manager.reset_prefix_cache()
