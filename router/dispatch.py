"""Finding a decode worker that admits a request (steps 1-2 of RequestRun's life cycle).

Decode workers are tried in `rank_decode_workers` order, each with its own route (local
or remote prefill depends on what that worker already caches); with the latency route
policy, in the order of their best routes' predicted TTFT (router.latency), those with room
for the request first. Both read the directory's worker index (router.worker_index) at the
moment each is decided, and the prefix index only for the workers the decision reads
(ClusterSnapshot.overlap_scope). A refusal or an RPC error moves on to the next one, up to
`max_admit_attempts`; the accepted Admit stream is the request's lifetime on that worker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import grpc

from splitserve.common.grpc_util import ServiceError
from splitserve.router.latency import (
    RoutePrediction,
    TtftUnmetError,
    best_routes_from,
    order_routes,
)
from splitserve.router.output_channel import Mailbox, OutputChannel
from splitserve.router.policy import (
    Route,
    WorkerView,
    blocks_needed,
    cached_tokens,
    plan_route_from,
)
from splitserve.router.relay import RequestTrace
from splitserve.router.state import RouterState
from splitserve.router.validation import ValidatedRequest
from splitserve.router.watch import WorkerLost, health_probe, watched
from splitserve.router.workers import Assignment, ClusterSnapshot
from splitserve.v1 import worker_pb2

_ADMISSION_TIMEOUT_S = 30.0  # wait for the Admission, the Admit stream's first message
_REFUSAL = worker_pb2.AdmitRefusal


@dataclass
class Admitted:
    route: Route
    admission: worker_pb2.Admission
    call: grpc.aio.UnaryStreamCall  # the Admit stream; cancelling it frees D's blocks
    num_blocks: int  # KV blocks the request may grow to (prompt + max_tokens)
    assignment: Assignment  # the request's load on D, counted until it is released
    # D's outputs come here, over the router's output channel, not on `call` (None: on it).
    mailbox: Mailbox | None = None
    channel: OutputChannel | None = None


async def admit_request(
    state: RouterState,
    request: ValidatedRequest,
    trace: RequestTrace,
    remaining: Callable[[], float | None],
    exclude: Collection[str] = (),
    local: bool = False,
    kv_source: WorkerView | None = None,
) -> Admitted:
    """Admit `request` on a decode worker; ServiceError when none does.

    `exclude`: addresses of workers this request lost already (neither prefills nor
    decodes it; a worker restarted elsewhere is a new address). When that leaves no decode
    worker, all are offered again: a dead one fails fast, and a live one may serve.
    `local`: the decode worker prefills the prompt itself, whatever the policy says.
    `kv_source`: the prompt's KV comes from this worker instead of a prefill (a draining
    decode worker migrating the request: it ships the KV it holds).

    UNAVAILABLE: no usable decode worker, or all failed; RESOURCE_EXHAUSTED: one at least
    lacked free blocks; INVALID_ARGUMENT: all found the request too long.
    """
    snapshot = (await state.directory.snapshot()).without(exclude)
    if not snapshot.has_decode():
        snapshot = (await state.directory.snapshot(force=True)).without(exclude)
    if not snapshot.has_decode() and exclude:
        snapshot = await state.directory.snapshot()
    if not snapshot.has_decode():
        ignored = f" ({snapshot.num_ignored} live workers serve another model or block size)"
        raise ServiceError(
            grpc.StatusCode.UNAVAILABLE,
            f"no live decode worker serves model {state.model.model_id!r}"
            f"{ignored if snapshot.num_ignored else ''}; start one and retry",
        )
    num_blocks = blocks_needed(
        request.prompt_len + request.params.max_tokens, state.rules.block_size
    )
    failures: list[str] = []
    refusals: list[int] = []
    ranked = snapshot.rank_decode(num_blocks, state.max_admit_attempts)
    latency = kv_source is None and state.config.route_policy == "latency"
    scope = snapshot.overlap_scope(ranked, latency or state.policy.reads_prefill_overlap)
    overlap = await state.store.weighted_prefix_overlap(request.block_hashes, scope,
                                                        state.rules)
    predicted: dict[str, RoutePrediction] = {}  # decode worker id -> its predicted route
    if latency:
        predicted = _latency_routes(state, request, trace, ranked, snapshot, overlap,
                                    num_blocks, local)
        if predicted:
            ranked = [p.route.decode for p in predicted.values()]
    for decode in ranked:
        prediction = predicted.get(decode.worker_id)
        if kv_source is not None:
            route = Route(decode, kv_source)
        elif prediction is not None:
            route = prediction.route
            trace.predicted_ttft_s = prediction.ttft_ms / 1e3
        else:
            candidates = None if local else snapshot.prefill_candidates(decode.worker_id)
            route = plan_route_from(decode, candidates, request.prompt_len, overlap,
                                    state.rules, state.policy)
        if trace.dispatched is None:
            trace.dispatched = time.monotonic()
        # Counted before the Admit is awaited: a burst of requests ranking the workers
        # meanwhile sees this one and spreads out instead of piling onto one worker.
        # A local prefill's prompt tokens queue on D: counted at once too, so that the
        # next prompt is not sent behind a long one (policy.QUEUED_TOKENS_PER_RANK).
        queued = 0 if route.prefill is not None else request.prompt_len - round(
            cached_tokens(overlap.get(decode.worker_id, 0), state.rules.block_size,
                          request.prompt_len))
        assignment = state.directory.assign(decode.worker_id, running=1, blocks=num_blocks,
                                            queued_tokens=queued)
        channel: OutputChannel | None = None
        try:
            # D's outputs over the router's output channel to it, when one is open (or
            # opens within OPEN_WAIT_S: the router has just found D): the mailbox is there
            # before D can send anything.
            channel = await state.output_channels.ready(decode.address)
            mailbox = channel.open(request.worker_request_id) if channel is not None else None
            if mailbox is None:
                channel = None
            admitted = await _try_admit(state, request, route, remaining(), failures, refusals,
                                        channel.channel_id if channel is not None else "")
        except BaseException:
            state.directory.release(assignment)
            if channel is not None:
                channel.release(request.worker_request_id)
            raise
        if admitted is not None and not admitted[0].output_channel and channel is not None:
            channel.release(request.worker_request_id)  # D streams it over the Admit call
            channel = mailbox = None
        if admitted is not None:
            admission, call = admitted
            state.directory.delivered(assignment)
            return Admitted(route, admission, call, num_blocks, assignment, mailbox, channel)
        if channel is not None:
            channel.release(request.worker_request_id)
        state.directory.release(assignment)
    raise admit_error(failures, refusals)


async def _try_admit(
    state: RouterState,
    request: ValidatedRequest,
    route: Route,
    timeout_s: float | None,
    failures: list[str],
    refusals: list[int],
    output_channel: str,
) -> tuple[worker_pb2.Admission, grpc.aio.UnaryStreamCall] | None:
    decode, prefill = route.decode, route.prefill
    message = worker_pb2.AdmitRequest(
        request_id=request.worker_request_id,
        prompt_token_ids=request.prompt_token_ids,
        sampling_params=request.worker_params,
        prefill_locally=prefill is None,
        prefill_worker_id=prefill.worker_id if prefill else "",
        prefill_kv_endpoint=prefill.kv_endpoint if prefill else "",
        prefill_timeout_ms=state.prefill_timeout_ms,
        num_sampled=request.num_sampled,
        priority=request.priority,
        stream_pace_tokens_per_s=request.stream_pace_tokens_per_s,
        client=request.client,
        output_channel=output_channel,
    )
    directory = state.directory
    call = directory.decode_stub(decode).Admit(message, timeout=timeout_s)
    try:
        # Watched: a frozen or partitioned D (an open connection that no longer delivers)
        # is found by its health probes in ~14 s, not at the end of the 30-s wait.
        first = await asyncio.wait_for(
            watched(call.read(), "decode", decode, health_probe(directory, decode), directory),
            _ADMISSION_TIMEOUT_S)
    except grpc.aio.AioRpcError as exc:
        failures.append(f"{decode.worker_id}: {exc.code().name}: {exc.details()}")
        return None
    except WorkerLost as lost:
        call.cancel()
        directory.eject(decode, lost.message)  # the next requests rank the others first
        failures.append(f"{decode.worker_id}: {lost.message}")
        return None
    except asyncio.TimeoutError:
        call.cancel()
        failures.append(f"{decode.worker_id}: no Admission within {_ADMISSION_TIMEOUT_S:g} s")
        return None
    except BaseException:  # the request was cancelled while D admitted it: D frees it
        call.cancel()
        raise
    if first is grpc.aio.EOF or first.WhichOneof("event") != "admission":
        call.cancel()
        failures.append(f"{decode.worker_id}: the Admit stream did not start with an Admission")
        return None
    admission = first.admission
    state.output_channels.learn(decode.address, admission.output_endpoint)
    if not admission.accepted:
        call.cancel()
        refusals.append(admission.refusal)
        name = _REFUSAL.Name(admission.refusal)
        failures.append(f"{decode.worker_id} refused: {name}: {admission.refusal_message}")
        return None
    return admission, call


def _latency_routes(
    state: RouterState, request: ValidatedRequest, trace: RequestTrace,
    ranked: list[WorkerView], snapshot: ClusterSnapshot, overlap: Mapping[str, float],
    num_blocks: int, local: bool,
) -> dict[str, RoutePrediction]:
    """The decode workers' best predicted routes in the order to try them: those with
    room for the request first, then those meeting its TTFT SLO, then by expected
    end-to-end time; {} while some worker's step times are unknown. TtftUnmetError when the
    request has a TTFT SLO that even the best would miss."""
    routes = best_routes_from(ranked, snapshot.prefill_candidates(), request.prompt_len,
                              overlap, state.rules.block_size, local_only=local)
    if not routes:
        return {}
    best = min(routes, key=lambda p: p.key)
    waited_s = time.monotonic() - trace.arrival
    slo_s = request.ttft_slo_ms / 1e3
    # Only a request's first attempt: a resumed one has streamed already and must finish.
    if slo_s and not trace.resumed and waited_s + best.ttft_ms / 1e3 > slo_s:
        raise TtftUnmetError(waited_s + best.ttft_ms / 1e3, slo_s)
    ordered = order_routes(routes, num_blocks, request.params.max_tokens, waited_s, slo_s)
    return {p.route.decode.worker_id: p for p in ordered}


def admit_error(failures: list[str], refusals: list[int]) -> ServiceError:
    """The status for a request no decode worker admitted."""
    detail = "; ".join(failures)
    if refusals and len(refusals) == len(failures):
        if all(r == _REFUSAL.ADMIT_REFUSAL_TOO_LONG for r in refusals):
            return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"request too long: {detail}")
    if _REFUSAL.ADMIT_REFUSAL_NO_FREE_BLOCKS in refusals:
        return ServiceError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"no decode worker has room for the request, retry later: {detail}",
        )
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE, f"no decode worker admitted the request: {detail}"
    )
