"""The discrete-event simulation of one deployment serving one request trace.

Life cycle of a simulated request (times in seconds from the run's start):
1. It arrives (its scheduled time: the bench's seeded arrivals). The router ranks the
   decode workers with the real `rank_decode_workers` and routes with the real
   `plan_route` and prefill policy, over `WorkerView`s built from the simulated workers'
   exact state (the real router sees heartbeat reports plus its own assignments: a lag
   not modelled).
2. Local prefill: after `ttft_local_ms` (router, Admit and relay costs) it joins its decode
   worker's queue and is prefilled there in chunks beside the running decodes.
   Remote prefill: the decode worker reserves the prompt's blocks at once, and the
   prompt joins the prefill worker's queue (max_tokens 1) `ttft_remote_ms` later; with
   `Deployment.admit_between_steps` only after the decode worker's running step ends (its
   engine thread runs the admission between steps: inside a CUDA graph it cannot stop
   between layers as it does otherwise). When the
   step computing its last chunk ends, the KV transfer's exposed part (transfer time
   beyond that step's compute: layer-wise overlap) passes, then the first token reaches
   the client and the sequence joins the decode worker's running batch.
3. Every step's sampled tokens reach the client when the step ends; a sequence with
   max_tokens outputs finishes and frees its blocks.
Each worker runs one step at a time; a step's length is the ProfiledStepTimes's, plus the
profile's per-step serving overhead. With `Deployment.shared_host` (workers on one machine's
cores) a step's compute is multiplied by the profile's co-run factor for the kinds of step
the other workers are running when it starts (sim.corun measures them between bare
engines; a decode or prefill step under another worker's decode step takes the factor
measured in the served deployments instead, when the profile has it). Chance comes from
the trace and, when a HostSpeed is given, from the host's drifting speed (sim.speed), which
multiplies every step's compute by the factor of the period it starts in; without one the
simulation is deterministic.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from splitserve.bench.metrics import RequestRecord
from splitserve.router.policy import (
    RoutingRules,
    WorkerView,
    blocks_needed,
    make_prefill_policy,
    plan_route,
    rank_decode_workers,
)
from splitserve.sim.profile import ProfiledStepTimes
from splitserve.sim.scheduler import SimScheduler, SimSequence, SimStep
from splitserve.sim.speed import HostSpeed


@dataclass(frozen=True)
class SimRequest:
    index: int
    arrival_s: float
    prompt_tokens: int
    max_tokens: int
    tag: str = ""


@dataclass(frozen=True)
class Deployment:
    """Worker counts and the engine / router settings of every worker."""

    num_prefill: int = 0
    num_decode: int = 2  # decode workers prefill locally what the router keeps local
    local_prefill_threshold: int = 10**9  # the router's; 0 sends every prompt to prefill
    block_size: int = 16
    num_kv_blocks: int = 512
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    prefill_policy: str = "kv_aware"
    # Every worker on one host's cores (bench disagg on one machine): steps slow each other
    # by the profile's corun factors. False: one device per worker (the planner's case).
    shared_host: bool = False
    # The decode workers admit a remote prefill only between steps (their steps run as
    # CUDA graphs); False: between two layers of the step in flight, at once here.
    admit_between_steps: bool = False

    def __post_init__(self) -> None:
        if self.num_decode < 1 or self.num_prefill < 0:
            raise ValueError("a deployment needs >= 1 decode worker and >= 0 prefill workers")

    @property
    def num_workers(self) -> int:
        return self.num_prefill + self.num_decode

    @property
    def name(self) -> str:
        if self.num_prefill == 0:
            return f"colocated x{self.num_decode}"
        return f"{self.num_prefill}P+{self.num_decode}D"


@dataclass(eq=False)
class _Worker:
    worker_id: str
    scheduler: SimScheduler
    busy: bool = False
    step: SimStep | None = None
    step_prefill_ms: float = 0.0
    step_kind: str = "decode"  # of the step running: "prefill" (prompt tokens) | "decode"
    busy_s: float = 0.0  # time spent in steps, for utilization
    step_end_s: float = 0.0  # when the step running (if busy) ends
    # decode side: remote-prefilled sequences whose KV has not arrived (they hold blocks)
    incoming: set[int] = field(default_factory=set)


@dataclass(eq=False)
class _Flight:
    """One request in the simulation."""

    request: SimRequest
    record: RequestRecord
    decode_seq: SimSequence
    decode: _Worker
    prefill: _Worker | None = None


class Simulation:
    def __init__(self, deployment: Deployment, model: ProfiledStepTimes,
                 speed: HostSpeed | None = None) -> None:
        self.deployment = deployment
        self.model = model
        self.speed = speed
        self.rules = RoutingRules(block_size=deployment.block_size,
                                  local_prefill_threshold=deployment.local_prefill_threshold)
        self.policy = make_prefill_policy(deployment.prefill_policy)
        self.decode = [self._worker(f"decode-{i}") for i in range(deployment.num_decode)]
        self.prefill = [self._worker(f"prefill-{i}") for i in range(deployment.num_prefill)]
        self._events: list[tuple[float, int, Callable[[float], None]]] = []
        self._order = itertools.count()
        self._flights: dict[str, _Flight] = {}
        self.records: list[RequestRecord] = []

    def _worker(self, worker_id: str) -> _Worker:
        d = self.deployment
        return _Worker(worker_id, SimScheduler(d.num_kv_blocks, d.block_size, d.max_num_seqs,
                                               d.max_num_batched_tokens))

    def at(self, time_s: float, action: Callable[[float], None]) -> None:
        heapq.heappush(self._events, (time_s, next(self._order), action))

    def run(self, trace: list[SimRequest]) -> list[RequestRecord]:
        """Serve `trace` to the end; one RequestRecord per request, in trace order."""
        for request in trace:
            self.at(request.arrival_s, partial(self._arrive, request))
        while self._events:
            now, _, action = heapq.heappop(self._events)
            action(now)
        return sorted(self.records, key=lambda r: r.index)

    # ---- routing -------------------------------------------------------------------------
    def _view(self, worker: _Worker) -> WorkerView:
        s = worker.scheduler
        prefilling = sum(q.num_uncomputed_tokens for q in s.running if q.is_prefilling)
        return WorkerView(worker.worker_id, num_waiting=len(s.waiting),
                          num_running=len(s.running) + len(worker.incoming),
                          num_free_blocks=s.num_free_blocks, num_total_blocks=s.num_blocks,
                          num_queued_tokens=s.num_queued_tokens + prefilling)

    def _arrive(self, request: SimRequest, now: float) -> None:
        record = RequestRecord(index=request.index, tag=request.tag, scheduled_s=now,
                               prompt_tokens=request.prompt_tokens)
        record.mark_sent(now)
        self.records.append(record)
        by_id = {w.worker_id: w for w in self.decode + self.prefill}
        need = blocks_needed(request.prompt_tokens + request.max_tokens, self.rules.block_size)
        ranked = rank_decode_workers([self._view(w) for w in self.decode], need)
        prefill_views = [self._view(w) for w in self.prefill]
        for view in ranked:
            route = plan_route(view, prefill_views, request.prompt_tokens, {}, self.rules,
                               self.policy)
            decode = by_id[view.worker_id]
            seq = SimSequence(f"r{request.index}", request.prompt_tokens, request.max_tokens,
                              arrival_index=request.index)
            if route.prefill is None:
                flight = _Flight(request, record, seq, decode)
                delay = self.model.profile.serving.ttft_local_ms / 1e3
                self.at(now + delay, partial(self._enqueue, decode, seq))
            else:
                if not decode.scheduler.reserve(seq, request.prompt_tokens):
                    continue  # refused for blocks: the next decode worker
                decode.incoming.add(id(seq))
                prefill = by_id[route.prefill.worker_id]
                flight = _Flight(request, record, seq, decode, prefill)
                prompt = SimSequence(seq.request_id, request.prompt_tokens, 1,
                                     arrival_index=request.index)
                waits = decode.busy and self.deployment.admit_between_steps
                admitted = max(now, decode.step_end_s) if waits else now
                delay = self.model.profile.serving.ttft_remote_ms / 1e3
                self.at(admitted + delay, partial(self._enqueue, prefill, prompt))
            self._flights[seq.request_id] = flight
            return
        record.fail(now, "no decode worker admitted the request")

    # ---- workers -------------------------------------------------------------------------
    def _enqueue(self, worker: _Worker, seq: SimSequence, now: float) -> None:
        worker.scheduler.add(seq)
        self._start_step(worker, now)

    def _start_step(self, worker: _Worker, now: float) -> None:
        if worker.busy or not worker.scheduler.has_work():
            return
        step = worker.scheduler.schedule()
        if not step.scheduled:
            return  # blocked on blocks: a finishing sequence restarts it
        decodes = step.decodes
        context = (sum(s.num_computed_tokens for s in decodes) / len(decodes)) if decodes else 0.0
        prefill_tokens = step.num_prefill_tokens
        compute_ms = self.model.step_ms(prefill_tokens, len(decodes), context)
        kind = "prefill" if prefill_tokens else "decode"
        if self.deployment.shared_host:
            others = [w.step_kind for w in self.decode + self.prefill if w.busy and w is not worker]
            compute_ms *= self.model.corun_factor(kind, others)
        if self.speed is not None:
            compute_ms *= self.speed.factor(now, kind)
        worker.busy, worker.step, worker.step_prefill_ms = True, step, compute_ms
        worker.step_kind = kind
        duration_s = (compute_ms + self.model.profile.serving.decode_step_ms) / 1e3
        worker.busy_s += duration_s
        worker.step_end_s = now + duration_s
        self.at(worker.step_end_s, partial(self._end_step, worker))

    def _end_step(self, worker: _Worker, now: float) -> None:
        step = worker.step
        assert step is not None
        worker.busy, worker.step = False, None
        is_prefill_worker = worker in self.prefill
        finished = False
        for seq in worker.scheduler.complete(step):
            flight = self._flights[seq.request_id]
            if is_prefill_worker:
                worker.scheduler.remove(seq)
                transfer_ms = self.model.transfer_ms(seq.num_prompt_tokens)
                exposed_s = max(0.0, transfer_ms - worker.step_prefill_ms) / 1e3
                self.at(now + exposed_s, partial(self._kv_arrived, flight))
                continue
            flight.record.add_chunk(now, 1)
            if seq.is_done:
                worker.scheduler.remove(seq)
                self._finish(flight, now)
                finished = True
        self._restart(self.decode if finished else [worker], now)

    def _kv_arrived(self, flight: _Flight, now: float) -> None:
        seq, decode = flight.decode_seq, flight.decode
        decode.incoming.discard(id(seq))
        seq.num_computed_tokens = seq.num_prompt_tokens
        seq.num_tokens = seq.num_prompt_tokens + 1
        flight.record.add_chunk(now, 1)
        if seq.is_done:
            decode.scheduler.remove(seq)
            self._finish(flight, now)
            self._restart(self.decode, now)
        else:
            decode.scheduler.add_running(seq)
            self._start_step(decode, now)

    def _finish(self, flight: _Flight, now: float) -> None:
        del self._flights[flight.decode_seq.request_id]
        flight.record.finish(now, "length", flight.decode_seq.num_output_tokens,
                             flight.request.prompt_tokens)

    def _restart(self, workers: list[_Worker], now: float) -> None:
        """Idle workers with work start a step (blocks freed by a finished request may
        unblock one that stalled on them)."""
        for worker in workers:
            self._start_step(worker, now)


    def utilization(self, role: str) -> float:
        """Busy time / run duration, averaged over the role's workers ("prefill", "decode")."""
        workers = self.prefill if role == "prefill" else self.decode
        end = max((r.end_s or 0.0 for r in self.records), default=0.0)
        if not workers or end <= 0:
            return 0.0
        return sum(w.busy_s for w in workers) / (len(workers) * end)


def simulate(deployment: Deployment, model: ProfiledStepTimes, trace: list[SimRequest],
             speed: HostSpeed | None = None) -> list[RequestRecord]:
    return Simulation(deployment, model, speed).run(trace)
