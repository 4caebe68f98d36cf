"""One request's trip through the workers (the data path of DESIGN.md, steps 3-9).

Life cycle of a request on the router:
  1. route: pick the decode worker D (rank_decode_workers) and, per D, the prefill worker
     P or local prefill (plan_route); ledger QUEUED.
  2. D.Admit (server stream): the first message is D's Admission. A refusal or an RPC
     error moves on to the next ranked D (at most max_admit_attempts). Ledger ADMITTED.
  3. Remote prefill: P.Prefill with the Admission's block ids, cached-token count, KV
     layout and endpoint (ledger PREFILLING); relay P's first token to the client, then
     D.PrefillDone(first token). Local prefill skips this: D streams every token.
  4. Relay D's DecodeOutputs (ledger DECODING) through the TokenRelay until D finishes
     or the router's own checks (stop strings) end the request.
  5. Cleanup, always (finish, error, client cancel, deadline): D.Abort and cancel the
     Admit stream unless D ended it by itself, P.Abort if a Prefill is in flight, delete
     the ledger entry. So every KV block the request held is freed on both sides.

Resume: when a worker is lost mid-request (D's stream breaks, P fails or times out,
PrefillDone fails), the attempt's hold on its workers is released and the request starts
again from step 1 without the lost worker, at most `max_resumes` times. A draining D that
hands the request back (DecodeOutput.migrate) is resumed the same way, without counting
against max_resumes; when it kept the request's KV (migrate_kv_tokens), the continuation
is admitted naming the draining worker as its KV source and D.ShipKV sends the blocks over
(live migration: nothing recomputed; on failure, recompute). Once tokens have reached the
client, the new attempt's prompt is the prompt plus those tokens, prefilled remotely or on
the new D as any prompt is (num_sampled in AdmitRequest and PrefillRequest: a seeded
generator skips their draws), with max_tokens reduced by as many: the client's stream goes
on with no token repeated or missing, and greedy and seeded output equal an uninterrupted
run's. A worker that goes quiet is probed (`watched`): a frozen process closes no socket.

Paced streams (stream_pace_tokens_per_s): the relay makes one chunk per token and a
PacedEmit (router.pacing) releases them at the pace while this run goes on reading; run()
returns once the last chunk is out (the workers are freed before that).

Errors before the first chunk reach the client as a status; after it, as a last chunk with
FINISH_REASON_ERROR (or ABORT) and error_message, since the stream is already OK.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from splitserve.cluster.store import RequestPhase
from splitserve.common.convert.common import FINISH_REASONS, sampling_to_proto
from splitserve.common.grpc_util import PREFILL_ADMITTED, ServiceError
from splitserve.common.outputs import is_prefill_kv_failure
from splitserve.engine.block_hash import compute_block_hashes
from splitserve.router import output_channel
from splitserve.router.cluster_io import RequestLedger
from splitserve.router.dispatch import Admitted, admit_request
from splitserve.router.output_channel import ChannelLost, Mailbox, OutputChannel
from splitserve.router.pacing import PacedEmit
from splitserve.router.policy import Route, WorkerView, blocks_needed
from splitserve.router.relay import RelayStep, RequestTrace, TokenRelay, usage
from splitserve.router.state import RouterState
from splitserve.router.validation import ValidatedRequest
from splitserve.router.watch import (
    SilenceWatch,
    WorkerLost,
    answers_serving,
    health_probe,
    watched,
)
from splitserve.router.workers import Assignment, WorkerDirectory
from splitserve.v1 import common_pb2, router_pb2, worker_pb2

log = logging.getLogger(__name__)

Emit = Callable[[router_pb2.GenerateResponse], Awaitable[None]]

_ABORT_TIMEOUT_S = 2.0
# Worker errors that say the request itself is wrong: another worker would refuse it too.
_REQUEST_ERRORS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE)


_MAX_MIGRATIONS = 8  # hand-backs by draining decode workers one request may see


_PLANNED = ("decode_drained", "decode_migrated")  # reasons that are hand-backs


@dataclass(frozen=True)
class _Ship:
    """A continuation whose KV a draining decode worker ships (instead of a prefill)."""

    source: WorkerView  # the draining worker
    request_id: str  # the request's id there
    first_token_id: int  # the last token relayed: the continuation's first input


class _ShipFailed(Exception):
    """Shipping the KV failed: recompute the continuation instead."""


def resumed_request(
    request: ValidatedRequest, output_token_ids: list[int], attempt: int, block_size: int
) -> ValidatedRequest:
    """The request to admit after a lost worker, `output_token_ids` already delivered.

    Its own worker request id (the lost workers may still hold the old one), the output so
    far appended to the prompt and counted out of max_tokens."""
    worker_request_id = f"{request.worker_request_id}.{attempt}"
    n = len(output_token_ids)
    if n == 0:
        return dataclasses.replace(request, worker_request_id=worker_request_id)
    params = dataclasses.replace(request.params, max_tokens=request.params.max_tokens - n)
    prompt = [*request.prompt_token_ids, *output_token_ids]
    return dataclasses.replace(
        request,
        worker_request_id=worker_request_id,
        prompt_token_ids=prompt,
        params=params,
        worker_params=sampling_to_proto(params, with_stop_strings=False),
        block_hashes=compute_block_hashes(prompt, block_size),
        num_sampled=request.num_sampled + n,
    )


class RequestRun:
    def __init__(
        self,
        state: RouterState,
        request: ValidatedRequest,
        trace: RequestTrace,
        emit: Emit,
        deadline: float | None = None,  # time.monotonic() by which the request must end
    ) -> None:
        self._state = state
        self._req = request  # as the client sent it
        self._attempt = request  # what the current attempt sends to workers
        self._lost_workers: set[str] = set()  # addresses
        self._prefill_here = False  # prefill on the decode worker, whatever the policy says
        self._ship: _Ship | None = None  # the next attempt's KV comes from a draining worker
        self._num_attempts = 0  # attempts after the first (each gets its own worker id)
        self._trace = trace
        self._pacer = (PacedEmit(emit, request.stream_pace_tokens_per_s)
                       if request.stream_pace_tokens_per_s > 0 else None)
        self._emit: Emit = self._pacer if self._pacer is not None else emit
        self._unpaced_emit = emit
        self._deadline = deadline
        self._relay = TokenRelay(
            state.model.tokenizer, request.prompt_token_ids, request.params,
            state.model.max_model_len,
        )
        self._ledger = RequestLedger(state.store, request.worker_request_id, request.prompt_len)
        self._route: Route | None = None
        self._admit_call: grpc.aio.UnaryStreamCall | None = None
        self._decode_done = False  # D ended the Admit stream by itself
        self._decode_watch: SilenceWatch | None = None  # D's Admit stream, while relayed
        # With D's outputs over the router's output channel: the channel, the request's
        # mailbox on it, and the task that watches the (otherwise quiet) Admit stream.
        self._channel: OutputChannel | None = None
        self._mailbox: Mailbox | None = None
        self._stream_watch: asyncio.Task[None] | None = None
        self._prefill_call: grpc.aio.UnaryStreamCall | None = None  # in flight on P
        self._assignments: list[Assignment] = []
        self._num_chunks = 0
        self._final_sent = False

    @property
    def _rid(self) -> str:
        return self._attempt.worker_request_id

    def _remaining(self) -> float | None:
        return None if self._deadline is None else max(0.001, self._deadline - time.monotonic())

    # ---- the whole request ------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
            if self._pacer is not None:
                await self._pacer.drain()  # the paced stream's last tokens
        finally:
            if self._pacer is not None:
                self._pacer.close()

    async def _run(self) -> None:
        try:
            self._ledger.update(RequestPhase.QUEUED)
            while True:
                try:
                    await self._serve()
                    return
                except WorkerLost as lost:
                    if not await self._resume(lost):
                        return
                except _ShipFailed as failed:
                    log.warning("request %s: %s; recomputing its KV instead",
                                self._req.worker_request_id, failed)
                    await self._release_attempt()
                    self._recompute_instead()
                except ServiceError as exc:
                    if (self._trace.resumed and exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                            and not self._prefill_here):
                        # No room to reserve the resumed prompt's KV for a transfer: the
                        # decode worker's own queue takes it instead (waiting for blocks,
                        # preempting if it must), so a stream already running never ends
                        # for want of room elsewhere.
                        self._prefill_here = True
                        continue
                    if not self._trace.resumed or self._num_chunks == 0:
                        raise
                    await self._fail(f"resuming after a lost worker failed: {exc.message}")
                    return
        finally:
            await self._state.shielded(self._cleanup())

    async def _serve(self) -> None:
        """One attempt: admit, prefill (or receive shipped KV), decode. WorkerLost when a
        worker fails it, _ShipFailed when shipped KV did not arrive."""
        ship, self._ship = self._ship, None
        try:
            admitted = await admit_request(
                self._state, self._attempt, self._trace, self._remaining,
                exclude=self._lost_workers, local=self._prefill_here and ship is None,
                kv_source=ship.source if ship is not None else None)
        except ServiceError:
            if ship is not None:  # whatever comes next recomputes: it needs every token
                self._recompute_instead()
            raise
        self._admitted(admitted)
        if ship is not None:
            await self._ship_kv(ship, admitted.admission)
            if not await self._prefill_done(ship.source.worker_id, ship.first_token_id):
                return
        elif admitted.route.prefill is not None:
            if not await self._prefill_remotely(admitted.admission):
                return
        await self._relay_decode()

    def _recompute_instead(self) -> None:
        """A KV ship that will not happen: the next attempt's prompt holds every token
        relayed (a shipped attempt's left the last one out, its KV's first input)."""
        self._trace.resumed[-1] = "decode_drained"
        self._attempt = self._next_attempt(self._relay.output_token_ids)

    def _next_attempt(self, output_token_ids: list[int]) -> ValidatedRequest:
        self._num_attempts += 1
        return resumed_request(self._req, output_token_ids, self._num_attempts,
                               self._state.rules.block_size)

    async def _resume(self, lost: WorkerLost) -> bool:
        """Set up the next attempt after `lost`; False when the request ended instead."""
        if self._deadline is not None and time.monotonic() >= self._deadline:
            # The request's own deadline ran out (the worker's error may say so first):
            # no worker to blame, no time to resume.
            await self._fail(lost.message, grpc.StatusCode.DEADLINE_EXCEEDED)
            return False
        resumed = self._trace.resumed
        limit = _MAX_MIGRATIONS if lost.planned else self._state.config.max_resumes
        done = sum((r in _PLANNED) == lost.planned for r in resumed)
        if done >= limit or self._final_sent:
            suffix = f" (no resume: {limit} done)" if limit else ""
            await self._fail(lost.message + suffix, lost.code)
            return False
        log.warning("request %s: %s; resuming on another worker after %d tokens",
                    self._req.worker_request_id, lost.message, self._relay.num_tokens)
        await self._release_attempt(lost)
        if not lost.channel_only:  # (a lost channel says nothing of the worker)
            if not lost.planned:
                self._state.directory.eject(lost.worker, lost.message)
            self._lost_workers.add(lost.worker.address)
        tokens = self._relay.output_token_ids
        if lost.planned and tokens and lost.kv_tokens == self._req.prompt_len + len(tokens) - 1:
            # The draining worker holds the KV of everything but the last token: ship it.
            self._ship = _Ship(lost.worker, self._rid, tokens[-1])
            resumed.append("decode_migrated")
            self._attempt = self._next_attempt(tokens[:-1])
        else:
            resumed.append(lost.reason)
            self._attempt = self._next_attempt(tokens)
        self._ledger.update(RequestPhase.QUEUED, decode_worker_id="", prefill_worker_id="",
                            num_decode_blocks=0, num_prefill_blocks=0,
                            num_generated_tokens=self._relay.num_tokens)
        return True

    async def finish_timeout(self, timeout_s: float) -> None:
        """The router's request_timeout_s ran out (the run was cancelled and cleaned up)."""
        message = f"request exceeded the router's request_timeout_s of {timeout_s:g} s"
        if self._num_chunks == 0:
            raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, message)
        if self._pacer is not None:  # what the pace still held goes out now, then the end
            await self._pacer.flush()
            self._emit = self._unpaced_emit
        if not self._final_sent:
            step = RelayStep([], [], self._relay.finish())
            await self._send(step, common_pb2.FINISH_REASON_ABORT, error_message=message)

    # ---- admission on D -------------------------------------------------------------

    def _admitted(self, admitted: Admitted) -> None:
        route, admission = admitted.route, admitted.admission
        self._route, self._admit_call = route, admitted.call
        self._channel, self._mailbox = admitted.channel, admitted.mailbox
        trace = self._trace
        trace.decode_worker_id = admission.decode_worker_id or route.decode.worker_id
        trace.prefill_local = route.prefill is None
        if route.prefill is None:
            trace.prefill_worker_id = trace.decode_worker_id
            trace.num_cached_tokens = admission.num_cached_tokens
        else:
            trace.prefill_worker_id = route.prefill.worker_id
        self._assignments.append(admitted.assignment)
        self._ledger.update(
            RequestPhase.ADMITTED,
            decode_worker_id=trace.decode_worker_id,
            num_decode_blocks=len(admission.block_ids),
        )

    # ---- remote prefill ---------------------------------------------------------------

    async def _prefill_remotely(self, admission: worker_pb2.Admission) -> bool:
        """P.Prefill, the first token to the client, D.PrefillDone. False: request over."""
        assert self._route is not None and self._route.prefill is not None
        prefill, req, state = self._route.prefill, self._attempt, self._state
        request = worker_pb2.PrefillRequest(
            request_id=self._rid,
            prompt_token_ids=req.prompt_token_ids,
            sampling_params=req.worker_params,
            decode_worker_id=self._trace.decode_worker_id,
            decode_kv_endpoint=admission.kv_endpoint,
            decode_block_ids=admission.block_ids,
            decode_num_cached_tokens=admission.num_cached_tokens,
            kv_layout=admission.kv_layout,
            num_sampled=req.num_sampled,
            priority=req.priority,
        )
        queued = state.directory.assign(prefill.worker_id, queued_tokens=req.prompt_len)
        self._ledger.update(
            RequestPhase.PREFILLING,
            prefill_worker_id=prefill.worker_id,
            num_prefill_blocks=blocks_needed(req.prompt_len, state.rules.block_size),
        )
        self._prefill_call = state.directory.prefill_call(
            prefill, request, _min_timeout(self._remaining(), state.prefill_timeout_s))
        admitted = asyncio.ensure_future(
            _when_admitted(self._prefill_call, state.directory, queued))
        try:
            response = await watched(_only_answer(self._prefill_call, prefill), "prefill",
                                     prefill, self._prober(prefill), state.directory)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            message = (f"prefill on worker {prefill.worker_id} failed: "
                       f"{code.name}: {exc.details()}")
            if code in _REQUEST_ERRORS:
                raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message) from exc
            if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                code = grpc.StatusCode.INTERNAL
            if self._admit_call is not None and self._admit_call.done():
                # D's stream already ended (D died, or gave up): the KV had nowhere to go.
                # P is not to blame.
                raise WorkerLost("decode", self._route.decode, message, code) from exc
            raise WorkerLost("prefill", prefill, message, code) from exc
        finally:
            admitted.cancel()
            state.directory.release(queued)
        self._prefill_call = None
        state.directory.succeeded(prefill)
        self._trace.add_prefill(response)
        logprobs = [response.first_token_logprob] if req.params.logprobs is not None else []
        step = self._relay.add([response.first_token_id], logprobs)
        if step.finish_reason is not None:
            await self._send(step, FINISH_REASONS[step.finish_reason], step.stop_string)
            return False
        await self._send(step)
        return await self._prefill_done(prefill.worker_id, response.first_token_id)

    async def _ship_kv(self, ship: _Ship, admission: worker_pb2.Admission) -> None:
        """The draining worker sends the held KV into the blocks the new one reserved."""
        request = worker_pb2.ShipKVRequest(
            request_id=ship.request_id, transfer_request_id=self._rid,
            dst_worker_id=self._trace.decode_worker_id, dst_kv_endpoint=admission.kv_endpoint,
            dst_block_ids=admission.block_ids, kv_layout=admission.kv_layout,
        )
        stub = self._state.directory.decode_stub(ship.source)
        timeout = _min_timeout(self._remaining(), self._state.prefill_timeout_s)
        try:
            response = await stub.ShipKV(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise _ShipFailed(f"ShipKV from {ship.source.worker_id} failed: "
                              f"{exc.code().name}: {exc.details()}") from exc
        self._trace.kv_transfer_bytes += response.kv_transfer_bytes
        self._ledger.update(RequestPhase.PREFILLING, prefill_worker_id=ship.source.worker_id)

    async def _prefill_done(self, prefill_worker_id: str, first_token_id: int) -> bool:
        assert self._route is not None
        stub = self._state.directory.decode_stub(self._route.decode)
        request = worker_pb2.PrefillDoneRequest(
            request_id=self._rid, prefill_worker_id=prefill_worker_id,
            first_token_id=first_token_id,
        )
        decode_id, decoder = self._trace.decode_worker_id, self._route.decode
        try:
            done = await watched(stub.PrefillDone(request, timeout=self._remaining()),
                                 "decode", decoder, self._prober(decoder),
                                 self._state.directory)
        except grpc.aio.AioRpcError as exc:
            raise WorkerLost("decode", decoder, f"PrefillDone on decode worker {decode_id} "
                             f"failed: {exc.code().name}: {exc.details()}") from exc
        if not done.found:
            raise WorkerLost("decode", decoder, f"decode worker {decode_id} no longer holds "
                             "the request (it gave up waiting for the KV or the first token)")
        # P freed its blocks once the KV was sent: only D holds the request now.
        self._ledger.update(RequestPhase.DECODING, prefill_worker_id="", num_prefill_blocks=0,
                            num_generated_tokens=self._relay.num_tokens)
        return True

    # ---- decode stream ----------------------------------------------------------------

    async def _relay_decode(self) -> None:
        assert self._admit_call is not None and self._route is not None
        decode_id, decoder = self._trace.decode_worker_id, self._route.decode
        while True:
            output = await self._read_decode(decoder)
            if self._trace.prefill_local and output.num_cached_tokens:
                self._trace.num_cached_tokens = output.num_cached_tokens  # D's prefix cache
            *earlier, step = self._relay_steps(output)
            for each in earlier:  # a paced stream's tokens, one chunk each
                await self._send(each)
            if output.token_ids:
                self._ledger.progress(RequestPhase.DECODING, self._relay.num_tokens)
            worker_reason = output.finish_reason
            if (worker_reason == common_pb2.FINISH_REASON_ERROR and self._route.prefill
                    and is_prefill_kv_failure(output.error_message)):
                # D is fine: the KV never came from P (a cut link, P died mid-send). D has
                # already freed the request; resume it without that prefill worker.
                self._decode_done = True
                raise WorkerLost("prefill", self._route.prefill,
                                 f"decode worker {decode_id}: {output.error_message}",
                                 grpc.StatusCode.UNAVAILABLE)
            if worker_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                self._decode_done = True
                self._trace.add_decode(output.timings)
                if worker_reason != common_pb2.FINISH_REASON_ERROR and not output.migrate:
                    self._state.directory.succeeded(decoder)
            if step.finish_reason is not None:
                await self._send(step, FINISH_REASONS[step.finish_reason], step.stop_string)
                return
            if worker_reason == common_pb2.FINISH_REASON_UNSPECIFIED or output.migrate:
                if step.token_ids or step.text:
                    await self._send(step)
                if output.migrate:
                    raise WorkerLost("decode", decoder, f"decode worker {decode_id} is "
                                     "draining", grpc.StatusCode.UNAVAILABLE, planned=True,
                                     kv_tokens=output.migrate_kv_tokens)
                continue
            step.text += self._relay.finish()
            if worker_reason == common_pb2.FINISH_REASON_ERROR:
                message_text = output.error_message or "unknown error"
                await self._fail(f"decode worker {decode_id} failed: {message_text}", step=step)
            else:
                await self._send(step, worker_reason, error_message=output.error_message)
            return

    def _relay_steps(self, output: worker_pb2.DecodeOutput) -> list[RelayStep]:
        """D's tokens through the relay: one step, or one per token for a paced stream (each
        released in a chunk of its own). Only the last step may finish the request."""
        if self._pacer is None or len(output.token_ids) <= 1:
            return [self._relay.add(output.token_ids, output.logprobs)]
        steps = []
        for i, token_id in enumerate(output.token_ids):
            steps.append(self._relay.add([token_id], output.logprobs[i:i + 1]))
            if steps[-1].finish_reason is not None:
                break
        return steps

    async def _read_decode(self, decoder: WorkerView) -> worker_pb2.DecodeOutput:
        """D's next output: off the request's mailbox on the output channel, or the Admit
        stream's next message. WorkerLost when D failed, ended the stream without
        finishing, or went quiet (see below), or when the channel closed.

        One output per engine step comes here, so D is watched by one timer task per
        stream (`SilenceWatch`), not a task and a timer per read as `watched` makes: a lost
        D is declared by the watch cancelling the call, which ends this read (over a
        channel: the stream's own watch task hands the loss to the mailbox)."""
        assert self._admit_call is not None
        decode_id = self._trace.decode_worker_id
        watch = self._decode_watch
        if watch is None:
            watch = self._decode_watch = SilenceWatch(
                self._admit_call, "decode", decoder, self._prober(decoder),
                self._state.directory)
            if self._mailbox is not None:
                self._stream_watch = asyncio.get_running_loop().create_task(
                    _watch_admit_stream(self._admit_call, self._mailbox, watch, decoder,
                                        decode_id, self._channel))
        output: worker_pb2.DecodeOutput | None
        try:
            if self._mailbox is not None:
                output = await self._mailbox.get()
            else:
                message = await self._admit_call.read()
                output = (None if message is grpc.aio.EOF
                          or message.WhichOneof("event") != "output" else message.output)
        except asyncio.CancelledError:
            if watch.lost is not None and not _being_cancelled():
                raise watch.lost from None
            raise
        except grpc.aio.AioRpcError as exc:
            if watch.lost is not None:
                raise watch.lost from None
            raise _decode_failed(decoder, decode_id, exc) from exc
        except ChannelLost as exc:  # (the worker ended the requests it had on the channel)
            raise await self._channel_lost(decoder, decode_id, exc) from exc
        if watch.lost is not None:
            raise watch.lost
        if output is None:
            raise WorkerLost("decode", decoder,
                             f"decode worker {decode_id} ended the stream without finishing")
        watch.heard()
        return output

    async def _channel_lost(self, decoder: WorkerView, decode_id: str,
                            exc: ChannelLost) -> WorkerLost:
        """The output channel carrying this request closed. That alone says nothing of the
        worker (it closes the channel of a router that fell behind), but a worker that died
        closes it too, and its Admit streams' errors may come only after: one health check
        tells them apart, so that a dead worker is ejected and its requests do not try it
        again, as when its stream breaks first."""
        channel = self._channel
        if channel is None:
            serving = await answers_serving(self._prober(decoder))
        else:  # one check for every request the channel carried
            if channel.serving_check is None:
                channel.serving_check = asyncio.ensure_future(
                    answers_serving(self._prober(decoder)))
            serving = await asyncio.shield(channel.serving_check)
        if serving:
            return WorkerLost("decode", decoder, f"decode worker {decode_id}: {exc}",
                              grpc.StatusCode.UNAVAILABLE, channel_only=True)
        return WorkerLost("decode", decoder, f"decode worker {decode_id}: {exc}, and it does "
                          "not answer its health check as serving", grpc.StatusCode.UNAVAILABLE)

    def _prober(self, worker: WorkerView) -> Callable[[], Awaitable[object]]:
        return health_probe(self._state.directory, worker)

    # ---- output -----------------------------------------------------------------------

    async def _send(
        self,
        step: RelayStep,
        finish_reason: common_pb2.FinishReason = common_pb2.FINISH_REASON_UNSPECIFIED,
        stop_string: str = "",
        error_message: str = "",
    ) -> None:
        now = time.monotonic()
        if step.token_ids and self._trace.first_token is None:
            self._trace.first_token = now
        chunk = router_pb2.GenerateResponse(
            request_id=self._req.request_id, token_ids=step.token_ids, text=step.text,
        )
        if self._req.params.logprobs is not None:
            chunk.logprobs.extend(step.logprobs)
        if finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            self._trace.finished = now
            chunk.finish_reason = finish_reason
            chunk.stop_string = stop_string
            chunk.error_message = error_message
            chunk.usage.CopyFrom(usage(
                self._req.prompt_len, self._relay.num_tokens, self._trace.num_cached_tokens
            ))
            chunk.timings.CopyFrom(self._trace.timings())
            self._final_sent = True
            log.debug("request %s finished: %s", self._rid,
                      common_pb2.FinishReason.Name(finish_reason))
        await self._emit(chunk)
        self._num_chunks += 1

    async def _fail(
        self,
        message: str,
        code: grpc.StatusCode = grpc.StatusCode.INTERNAL,
        step: RelayStep | None = None,
    ) -> None:
        """End the request on a worker failure: a status before the first chunk, else a
        last chunk with FINISH_REASON_ERROR."""
        if self._num_chunks == 0 and (step is None or not step.token_ids):
            if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                code = grpc.StatusCode.INTERNAL
            raise ServiceError(code, message)
        step = step or RelayStep([], [], self._relay.finish())
        await self._send(step, common_pb2.FINISH_REASON_ERROR, error_message=message)

    # ---- cleanup ----------------------------------------------------------------------

    async def _cleanup(self) -> None:
        await self._release_attempt()
        await self._ledger.delete()

    async def _release_attempt(self, lost: WorkerLost | None = None) -> None:
        """Free what the current attempt holds on its workers (not on `lost`'s: it is gone
        or wedged, and a stream cancel frees its side if it ever answers again)."""
        aborts: list[Awaitable[object]] = []
        route = self._route
        lost_address = lost.worker.address if lost is not None else None
        if self._prefill_call is not None and route is not None and route.prefill is not None:
            self._prefill_call.cancel()
            if route.prefill.address != lost_address:
                prefill_stub = self._state.directory.prefill_stub(route.prefill)
                aborts.append(prefill_stub.Abort(
                    worker_pb2.PrefillAbortRequest(request_id=self._rid),
                    timeout=_ABORT_TIMEOUT_S,
                ))
        if (self._admit_call is not None and not self._decode_done and route is not None
                and route.decode.address != lost_address):
            decode_stub = self._state.directory.decode_stub(route.decode)
            aborts.append(decode_stub.Abort(
                worker_pb2.DecodeAbortRequest(request_id=self._rid), timeout=_ABORT_TIMEOUT_S
            ))
        for result in await asyncio.gather(*aborts, return_exceptions=True):
            if isinstance(result, grpc.aio.AioRpcError):
                # The worker is gone (its blocks with it) or wedged: nothing more to do.
                log.info("abort of request %s failed: %s: %s", self._rid,
                         result.code().name, result.details())
            elif isinstance(result, BaseException):
                log.warning("abort of request %s failed: %r", self._rid, result)
        if self._decode_watch is not None:
            self._decode_watch.stop()
            self._decode_watch = None
        if self._stream_watch is not None:
            self._stream_watch.cancel()
            self._stream_watch = None
        if self._channel is not None:
            self._channel.release(self._rid)
        self._channel, self._mailbox = None, None
        if self._admit_call is not None:
            self._admit_call.cancel()  # frees D's blocks too; a no-op once D ended it
        for assignment in self._assignments:
            self._state.directory.release(assignment)
        self._assignments.clear()
        self._route, self._admit_call, self._prefill_call = None, None, None
        self._decode_done = False


def _decode_failed(decoder: WorkerView, decode_id: str,
                   exc: grpc.aio.AioRpcError) -> WorkerLost:
    return WorkerLost("decode", decoder, f"decode worker {decode_id} failed: "
                      f"{exc.code().name}: {exc.details()}", exc.code())


async def _watch_admit_stream(call: grpc.aio.UnaryStreamCall, mailbox: Mailbox,
                              watch: SilenceWatch, decoder: WorkerView, decode_id: str,
                              channel: OutputChannel | None) -> None:
    """While D's outputs go over the output channel its Admit stream is quiet until D ends
    it, after the last output: an end with an error (D failed, or `watch` cancelled the
    call) fails the request's reads; an output here breaks the protocol."""
    try:
        message = await call.read()
    except asyncio.CancelledError:
        if watch.lost is None:
            raise  # this task was cancelled: the request is leaving the worker
        mailbox.fail(watch.lost)
        return
    except grpc.aio.AioRpcError as exc:
        mailbox.fail(watch.lost or _decode_failed(decoder, decode_id, exc))
        return
    if message is not grpc.aio.EOF:
        mailbox.fail(WorkerLost("decode", decoder, f"decode worker {decode_id} sent a "
                                "message on an Admit stream whose outputs go over its "
                                "output channel"))
        return
    # EOF: D's last output went onto the channel. One channel carries a worker's outputs
    # in order, so a last output that has not come long after is lost with the channel
    # (dead without closing): close it, which fails the mailboxes of every request on it
    # (ChannelLost: they resume), rather than leave them waiting for ever. (Come is not
    # read: a request relaying to a slow client may read its last output much later.)
    if not mailbox.got_last:
        await asyncio.sleep(output_channel.LAST_OUTPUT_WAIT_S)
    if mailbox.got_last:
        return
    why = (f"decode worker {decode_id} ended a request's stream, but its last output did "
           f"not come over the output channel within {output_channel.LAST_OUTPUT_WAIT_S:g} s")
    log.warning("%s: closing the channel", why)
    if channel is not None:
        channel.close(why)  # (fails this request's mailbox with the others)
    else:
        mailbox.fail(ChannelLost(why))


async def _only_answer(call: grpc.aio.UnaryStreamCall, worker: WorkerView
                       ) -> worker_pb2.PrefillResponse:
    """The one answer of a Prefill call (WorkerDirectory.prefill_call); a failed call
    raises its AioRpcError, as a unary call's await does. Cancelled: the call too."""
    try:
        response = await call.read()
    except asyncio.CancelledError:
        call.cancel()
        raise
    if response is grpc.aio.EOF:  # ended with OK but no answer: not a prefill worker's way
        raise ServiceError(grpc.StatusCode.INTERNAL,
                           f"prefill worker {worker.worker_id} ended the call without an answer")
    assert isinstance(response, worker_pb2.PrefillResponse)
    return response


async def _when_admitted(call: grpc.aio.UnaryStreamCall, directory: WorkerDirectory,
                         assignment: Assignment) -> None:
    """The prefill worker queued the prompt (its initial metadata says so, before its
    answer): a load report it takes from now on shows the prompt, one taken before may
    not, so the router counts the prompt until a newer one (WorkerDirectory.delivered)."""
    try:
        metadata = await call.initial_metadata()
    except grpc.RpcError:  # the call failed: its error is handled where it is awaited
        return
    key, value = PREFILL_ADMITTED
    if metadata is not None and value in metadata.get_all(key):
        directory.delivered(assignment)


def _being_cancelled() -> bool:
    """Whether the running task itself is being cancelled (not only a call it awaited)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _min_timeout(a: float | None, b: float | None) -> float | None:
    values = [t for t in (a, b) if t is not None]
    return min(values) if values else None
