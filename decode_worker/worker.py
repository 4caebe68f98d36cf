"""The decode worker: receives prompts' KV and generates with continuous batching.

Life cycle of a request:
1. Admit (gRPC stream, from the router). Remote prefill: reserve blocks for the whole
   prompt and post a KV receive from the named prefill worker into them; or refuse
   (no free blocks, draining, too long, duplicate id). Local prefill (conditional
   disaggregation): queue the prompt in this engine like a colocated request.
2. The Admission (block ids, KV layout, endpoint) is the stream's first message.
3. Remote prefill only: a poller on the engine thread watches the receive; PrefillDone
   brings the first token sampled by the prefill worker. With both, the request joins the
   running batch (engine.add_prefilled_request) and decodes from its next step on. A
   failed or timed-out receive frees the reserved blocks and ends the stream with an error.
4. Every step's tokens go to the request's output queue; the Admit stream relays them.
   A paced request (stream_pace_tokens_per_s) sits out the steps in which it is more
   than its buffer ahead of its reader (engine/pacing.py); its tokens still go out as
   they are made, and the router releases them to the client at the pace.
   The queue is bounded (WorkerOptions.max_output_backlog): a stream whose reader stops
   reading is cut off and its request aborted; the engine never waits for a reader.
5. Finish, Abort, or the router cancelling the stream frees every block the request holds.

Drain with migration (SIGTERM on `splitserve decode`) and another decode worker live: the
running requests are handed back to the router (DecodeOutput.migrate), which resumes them
there; requests still waiting for their KV are handed back once they join. A request
between steps keeps its KV here for _PARK_S (migrate_kv_tokens says how much): the router
admits its continuation on the next worker naming this one as the KV source, and ShipKV
sends the blocks over kvtransfer, so nothing is recomputed (live migration). Unclaimed,
the blocks are freed when the hold expires. Alone, or in a plain drain (the Drain RPC, a
whole deployment stopping), requests finish here. A role switch (worker.flip) drains with
migration too; whatever is left when its timeout runs out is handed back without its KV
(abort_in_flight), so the router recomputes it elsewhere.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from splitserve.cluster.store import ClusterStore, WorkerRole
from splitserve.common import tls
from splitserve.common.frames import frame
from splitserve.common.grpc_util import ServiceError
from splitserve.common.kv_layout import KVLayout, check_compatible
from splitserve.common.metrics import WorkerStatsSnapshot
from splitserve.common.outputs import KV_RECEIVE_FAILED, PREFILL_TIMED_OUT, StepOutput
from splitserve.common.sampling_params import SamplingParams
from splitserve.common.stream_pace import check_stream_pace
from splitserve.decode_worker.output_channel import OutputChannel, OutputChannelServer
from splitserve.decode_worker.stream_output import decode_output, decode_timings
from splitserve.engine.engine_loop import EngineStopped
from splitserve.engine.llm_engine import DetachedRequest, LLMEngine
from splitserve.engine.model_files import model_name
from splitserve.kvtransfer.state import KVTransfer, TransferState
from splitserve.v1 import common_pb2, worker_pb2
from splitserve.worker.core import WorkerCore
from splitserve.worker.runtime import WorkerOptions, WorkerRuntime

log = logging.getLogger(__name__)


class AdmitRefused(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason  # no_free_blocks | draining | too_long | duplicate


@dataclass(slots=True)
class DecodeEvent:
    """What an Admit stream relays: a step output, the end of the request with an error,
    or its hand-back to the router (the worker is draining)."""

    output: StepOutput | None = None
    error: str | None = None
    migrate: bool = False
    kv_tokens: int = 0  # with migrate: tokens whose KV is held here for ShipKV
    lost: str = ""  # the worker can no longer serve it (why): see end_lost


_PARK_S = 10.0  # how long a migrated request's KV waits here for ShipKV
# How long a worker that stops or changes role gives its output channels to deliver what
# they hold (the last outputs of requests that ended) before it closes them.
CHANNEL_DRAIN_S = 2.0


@dataclass(slots=True)
class ParkedKV:
    """A migrated request's KV, held for ShipKV until `expires_at` (engine thread only)."""

    request: DetachedRequest
    expires_at: float


@dataclass(slots=True)
class DecodeRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    events: queue.Queue[DecodeEvent] = field(default_factory=queue.Queue)
    block_ids: list[int] = field(default_factory=list)  # reserved for incoming KV
    transfer: KVTransfer | None = None
    first_token_id: int | None = None
    admitted_at: float = field(default_factory=time.monotonic)
    kv_done_at: float | None = None
    joined_at: float | None = None
    prefill_deadline: float = 0.0
    prefilled_locally: bool = False  # D computes the prompt (no KV transfer)
    num_sampled: int = 0  # the prompt ends with this much of its own output (resumed)
    priority: int = 0  # scheduling class, lower first
    client: str = ""  # who sent it (fair share in the scheduler)
    stream_pace_tokens_per_s: float = 0.0  # a paced stream's rate; 0: not paced
    # Ends the Admit stream from any thread (its RPC context's cancel); set by the servicer.
    cancel_stream: Callable[[], object] | None = None
    # The router's output channel its outputs go over (None: its Admit stream's events).
    channel: OutputChannel | None = None
    num_generated: int = 0  # tokens sent over the channel (DecodeOutput.num_generated_tokens)
    ended: threading.Event = field(default_factory=threading.Event)  # its last output went
    channel_lost: bool = False  # the channel closed before its last output went
    lost: str = ""  # why this worker can no longer serve it (its engine failed): end_lost


def deliver(request: DecodeRequest, event: DecodeEvent, hold: bool = False) -> None:
    """Hand `event` to the request's stream: its Admit stream's events, or its output
    channel as a ChannelOutput frame (then `ended` once the last one went, or the channel
    closed: `channel_lost`). `hold`: a step's output, sent with the step's others when the
    engine loop flushes the channels (OutputChannel.send)."""
    channel = request.channel
    if channel is None:
        request.events.put(event)
        return
    message = worker_pb2.ChannelOutput(request_id=request.request_id)
    output = decode_output((event,), request.prefilled_locally, message.output)  # (no copy)
    request.num_generated += len(output.token_ids)
    output.num_generated_tokens = request.num_generated
    last = output.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
    if last:
        output.timings.CopyFrom(decode_timings(request))
    if not channel.send(frame(message), hold):
        request.channel_lost = True
        last = True
    if last:
        channel.unbind(request.request_id)
        request.ended.set()


def end_lost(request: DecodeRequest, reason: str) -> None:
    """End `request`'s stream as lost: this worker can no longer serve it (its engine
    failed). Its Admit stream fails with UNAVAILABLE, so the router resumes the request
    elsewhere as for a worker it lost (counted against the request's resumes: a request that
    makes every engine fail is not passed round the cluster for ever)."""
    request.lost = reason
    channel = request.channel
    if channel is None:
        request.events.put(DecodeEvent(lost=reason))
        return
    channel.unbind(request.request_id)  # nothing more goes over the channel for it
    request.ended.set()


class DecodeWorker(WorkerRuntime):
    role = "decode"

    def __init__(self, options: WorkerOptions, store: ClusterStore | None = None,
                 core: WorkerCore | None = None) -> None:
        # Routers' output channels (None: every request streams over its Admit stream);
        # before the servicer is registered, which advertises them.
        self.output_channels = (
            OutputChannelServer(options.host, options.resolved_cluster_token,
                                self._channel_closed)
            if options.output_channels and tls.current() is None else None)
        try:
            super().__init__(options, store, core)
        except BaseException:
            if self.output_channels is not None:
                self.output_channels.close()
            raise
        if self.output_channels is not None:
            self.loop.add_output_flush(self.output_channels.flush)
        self._waiting_kv: dict[str, DecodeRequest] = {}  # engine thread only
        self._num_waiting_kv = 0
        self._in_engine: dict[str, DecodeRequest] = {}  # engine thread only
        self._parked: dict[str, ParkedKV] = {}  # engine thread only
        self._num_parked = 0
        self._num_shipping = 0  # ShipKV calls in progress (their transfers keep us up)
        self._shipping_lock = threading.Lock()
        self.num_cut_off = 0  # streams cut off for not reading (engine thread writes)
        self.num_channel_streams = 0  # requests bound to an output channel
        self._count_lock = threading.Lock()

    @property
    def output_endpoint(self) -> str:
        """Registered in cluster state: routers connect when they find this worker, so its
        first requests go over the channel too (Admissions name it as well)."""
        return self.output_channels.endpoint if self.output_channels is not None else ""

    def _register(self, server: grpc.Server) -> list[str]:
        from splitserve.decode_worker.servicer import add_decode_servicer

        return add_decode_servicer(server, self)

    def num_pending(self) -> int:
        return self._num_waiting_kv + self._num_parked + self._num_shipping

    def in_flight(self) -> int:
        """This role's requests (not the engine's others: during a role switch the next
        role shares the engine)."""
        return len(self._in_engine) + self.num_pending()

    # ---- called from RPC threads ----------------------------------------------------------
    def admit(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prefill_locally: bool,
        prefill_worker_id: str,
        prefill_timeout_s: float,
        num_sampled: int = 0,
        priority: int = 0,
        stream_pace_tokens_per_s: float = 0.0,
        client: str = "",
        output_channel: str = "",
    ) -> DecodeRequest:
        """Admit or raise AdmitRefused / ValueError. The returned request's events queue
        carries its outputs, or its `channel` when the router's output channel named by
        `output_channel` is open here (and the stream is neither paced nor grouped by a
        stream interval). `num_sampled`: the prompt ends with that many tokens of the
        request's own output (a resumed request); `priority`: its scheduling class;
        `stream_pace_tokens_per_s`: its delivery rate (0: not paced)."""
        check_stream_pace(stream_pace_tokens_per_s)
        request = DecodeRequest(request_id, list(prompt_token_ids), params)
        request.num_sampled = num_sampled
        request.priority = priority
        request.stream_pace_tokens_per_s = stream_pace_tokens_per_s
        request.client = client
        if stream_pace_tokens_per_s <= 0 and self.options.stream_interval == 1:
            self.bind_output_channel(request, output_channel)

        def admit_on_loop(engine: LLMEngine) -> None:
            self._check_admissible(engine, request)
            if prefill_locally:
                request.prefilled_locally = True
                engine.add_request(request.prompt_token_ids, params, request_id, num_sampled,
                                   priority, stream_pace_tokens_per_s, client)
                request.kv_done_at = request.joined_at = time.monotonic()
                self._stream_outputs(request)
                return
            blocks = engine.reserve_blocks(len(request.prompt_token_ids))
            if blocks is None:
                raise AdmitRefused("no_free_blocks", f"{self.worker_id} has no free KV blocks "
                                   f"for a {len(prompt_token_ids)}-token prompt")
            request.block_ids = blocks
            # From the reservation on: an admission that waited for a busy engine thread
            # does not arrive with its deadline already spent.
            request.prefill_deadline = time.monotonic() + prefill_timeout_s
            k_caches = [k for k, _ in engine.runner.kv_caches]
            v_caches = [v for _, v in engine.runner.kv_caches]
            request.transfer = self.kv.expect(
                request_id, prefill_worker_id, blocks, k_caches, v_caches,
                timeout_s=prefill_timeout_s,
            )
            self._waiting_kv[request_id] = request
            self._num_waiting_kv = len(self._waiting_kv)
            self.loop.add_poller(request_id, lambda: self._poll_kv(engine, request))

        # A remote prefill's reservation runs between two layers of a step in flight (the
        # prefill worker starts sooner); a local prefill's joins the scheduler between steps.
        try:
            self.loop.call(admit_on_loop, urgent=not prefill_locally)
        except BaseException as exc:
            if request.channel is not None:
                request.channel.unbind(request_id)
            if isinstance(exc, EngineStopped):  # its engine failed, or it is stopping
                raise AdmitRefused("draining", f"{self.worker_id} takes no more work: "
                                   f"{exc}") from exc
            raise
        return request

    def prefill_done(self, request_id: str, first_token_id: int) -> bool:
        def on_loop(engine: LLMEngine) -> bool:
            request = self._waiting_kv.get(request_id)
            if request is None:
                return False
            request.first_token_id = first_token_id
            self._poll_kv(engine, request)
            return True

        return self.loop.call(on_loop)

    def _abort(self, engine: LLMEngine, request_id: str) -> bool:
        request = self._waiting_kv.get(request_id)
        if request is not None:
            self._end_waiting(engine, request, "aborted", abort=True)
            return True
        if not engine.abort(request_id):
            return False
        self.loop.dispatch(StepOutput(request_id, [], "", True, "abort"))
        return True

    def bind_output_channel(self, request: DecodeRequest, channel_id: str) -> bool:
        """Send `request`'s outputs over the router's channel `channel_id` when it is open
        (before the request is admitted); whether they will."""
        if self.output_channels is None or not channel_id:
            return False
        channel = self.output_channels.get(channel_id)
        if channel is None or not channel.bind(request.request_id, request):
            return False
        request.channel = channel
        with self._count_lock:  # (RPC threads)
            self.num_channel_streams += 1
        return True

    def metrics_snapshot(self) -> WorkerStatsSnapshot:
        return dataclasses.replace(super().metrics_snapshot(),
                                   output_channel_streams=self.num_channel_streams)

    def _channel_closed(self, channel: OutputChannel) -> None:
        """A router's output channel closed (any thread, the engine's included): end the
        streams of the requests still on it and abort them, between steps."""
        for request in channel.unbind_all():
            request.channel_lost = True
            request.ended.set()
            self.abort_later(request.request_id)

    def release(self) -> None:
        if self.output_channels is not None:  # (the outputs of requests that ended go out)
            self.loop.remove_output_flush(self.output_channels.flush)
            self.output_channels.close(drain_s=CHANNEL_DRAIN_S)
        super().release()

    # ---- engine thread --------------------------------------------------------------------
    def _check_admissible(self, engine: LLMEngine, request: DecodeRequest) -> None:
        if self.draining.is_set():
            raise AdmitRefused("draining", f"{self.worker_id} is draining")
        if request.request_id in engine.requests or request.request_id in self._waiting_kv:
            raise AdmitRefused("duplicate", f"request id {request.request_id!r} already admitted")
        if len(request.prompt_token_ids) >= engine.max_model_len:
            raise AdmitRefused("too_long", f"prompt of {len(request.prompt_token_ids)} tokens "
                               f"does not fit the context ({engine.max_model_len})")
        engine.validate_prompt(request.prompt_token_ids, request.params)

    def _poll_kv(self, engine: LLMEngine, request: DecodeRequest) -> bool:
        """Returns False once the request left the waiting-for-KV state."""
        if request.request_id not in self._waiting_kv:
            return False
        assert request.transfer is not None
        state = request.transfer.poll()
        if state is TransferState.FAILED:
            self._end_waiting(engine, request, f"{KV_RECEIVE_FAILED}: {request.transfer.error}")
            return False
        if state is TransferState.DONE and request.kv_done_at is None:
            request.kv_done_at = time.monotonic()
        if request.first_token_id is None or state is not TransferState.DONE:
            if time.monotonic() > request.prefill_deadline:
                self._end_waiting(engine, request, PREFILL_TIMED_OUT)
                return False
            return True
        del self._waiting_kv[request.request_id]
        self._num_waiting_kv = len(self._waiting_kv)
        request.joined_at = time.monotonic()
        self._stream_outputs(request)
        try:
            finished = engine.add_prefilled_request(
                request.request_id, request.prompt_token_ids, request.first_token_id,
                request.params, request.block_ids, num_sampled=1 + request.num_sampled,
                priority=request.priority, client=request.client,
                stream_pace_tokens_per_s=request.stream_pace_tokens_per_s,
            )
        except Exception as exc:  # noqa: BLE001 - a refusal (ValueError) or a bug: its stream ends
            if not isinstance(exc, ValueError):
                log.exception("%s: request %s could not join the batch", self.worker_id,
                              request.request_id)
            if request.request_id in engine.requests:  # (it got part of the way in)
                engine.abort(request.request_id)  # (frees its blocks)
            else:
                engine.release_blocks(request.block_ids)
            self.loop.drop_sink(request.request_id)
            self._in_engine.pop(request.request_id, None)
            self.loop.count_finished("error")
            deliver(request, DecodeEvent(error=str(exc) or repr(exc)))
            return False
        if finished is not None:
            self.loop.dispatch(finished)
        return False

    def _stream_outputs(self, request: DecodeRequest) -> None:
        """The engine's outputs for `request` go to its Admit stream from now on."""
        request_id = request.request_id
        self._in_engine[request_id] = request

        limit = self.options.max_output_backlog

        def sink(out: StepOutput) -> None:
            deliver(request, DecodeEvent(out), hold=True)
            if out.finished:
                self._in_engine.pop(request_id, None)
            elif request.events.qsize() > limit:  # the reader is stuck: not the batch's problem
                self._cut_off(request)  # (a channel's reader: the channel's own backlog)

        self.loop.set_sink(request_id, sink)

    def _cut_off(self, request: DecodeRequest) -> None:
        """Abort a request whose stream stopped reading (engine thread, from its sink). Its
        stream ends now; the engine's abort runs as a command, between steps, not inside
        this step's dispatch (and a request the engine still holds when it fails first is
        gone with it: nothing is left waiting on the command)."""
        request_id = request.request_id
        self._in_engine.pop(request_id, None)
        self.loop.drop_sink(request_id)
        self.num_cut_off += 1
        log.warning("%s: request %s cut off: %d outputs not read by its stream", self.worker_id,
                    request_id, request.events.qsize())
        deliver(request, DecodeEvent(error="the stream stopped reading its output"))
        if request.cancel_stream is not None:
            request.cancel_stream()

        def on_loop(engine: LLMEngine) -> None:
            if engine.abort(request_id):
                self.loop.count_finished("abort")

        self.loop.post(on_loop, f"{self.worker_id}: aborting {request_id} (cut off)")

    # ---- drain --------------------------------------------------------------------------
    def _drain_step(self) -> None:
        """Hand the running requests back to the router when another decode worker can
        take them (checked in the cluster store); else let them finish here."""
        if self._in_engine and self._another_decode_worker():
            self.loop.call(self._migrate_running)

    def _another_decode_worker(self) -> bool:
        try:
            live = self.store.live_workers()
        except Exception:  # noqa: BLE001 - unknown: finish here rather than strand them
            return False
        model = model_name(self.options.engine.model)
        return any(info.worker_id != self.worker_id and info.model == model
                   and info.block_size == self.engine.block_size
                   and info.role.can_serve(WorkerRole.DECODE) for info, _ in live)

    def _migrate_running(self, engine: LLMEngine) -> None:
        for request_id, request in list(self._in_engine.items()):
            self._in_engine.pop(request_id)
            self.loop.drop_sink(request_id)
            detached = engine.detach(request_id) if self.options.kv_migration else None
            if detached is not None:  # its KV waits here for ShipKV
                self._parked[request_id] = ParkedKV(detached, time.monotonic() + _PARK_S)
                self._num_parked = len(self._parked)
                self.loop.add_poller(_park_key(request_id),
                                     functools.partial(self._expire_parked, engine, request_id))
                self.loop.count_finished("migrated")
                deliver(request, DecodeEvent(migrate=True,
                                               kv_tokens=detached.num_computed_tokens))
            elif engine.abort(request_id):
                self.loop.count_finished("migrated")
                deliver(request, DecodeEvent(migrate=True))

    def _expire_parked(self, engine: LLMEngine, request_id: str) -> bool:
        parked = self._parked.get(request_id)
        if parked is None:
            return False
        if time.monotonic() < parked.expires_at:
            return True
        self._unpark(engine, request_id)
        return False

    def _unpark(self, engine: LLMEngine, request_id: str) -> None:
        """Take a parked request's KV off the books and free its blocks."""
        parked = self._parked.pop(request_id, None)
        self._num_parked = len(self._parked)
        self.loop.remove_poller(_park_key(request_id))
        if parked is not None:
            engine.release_blocks(parked.request.block_ids)

    # ---- live migration: the source side (RPC thread) -------------------------------------
    def ship_kv(self, request_id: str, transfer_request_id: str, dst_worker: str,
                dst_endpoint: str, dst_block_ids: list[int], layout: KVLayout,
                timeout_s: float) -> tuple[int, float]:
        """Send a parked request's KV into `dst_worker`'s blocks; (bytes, ms) once every
        layer arrived. ServiceError otherwise. The blocks here are freed either way (the
        layers are copied out before that)."""
        try:
            check_compatible(self.layout, layout)
        except ValueError as exc:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from exc
        with self._shipping_lock:
            self._num_shipping += 1
        try:
            return self._ship_kv(request_id, transfer_request_id, dst_worker, dst_endpoint,
                                 dst_block_ids, timeout_s)
        finally:
            with self._shipping_lock:
                self._num_shipping -= 1

    def _ship_kv(self, request_id: str, transfer_request_id: str, dst_worker: str,
                 dst_endpoint: str, dst_block_ids: list[int], timeout_s: float
                 ) -> tuple[int, float]:
        started = time.monotonic()

        def on_loop(engine: LLMEngine) -> KVTransfer:
            parked = self._parked.get(request_id)
            if parked is None:
                raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"{self.worker_id} holds no KV of request {request_id!r} "
                                   "(never migrated here, shipped already, or expired)")
            try:
                transfer = self.kv.start_send(
                    transfer_request_id, dst_worker, parked.request.block_ids, dst_block_ids,
                    timeout_s=timeout_s, peer_endpoint=dst_endpoint,
                )
                caches = engine.runner.kv_caches
                self.kv.send_all_layers(transfer, [k for k, _ in caches], [v for _, v in caches])
            except ValueError as exc:
                raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"ShipKV: {exc}") from exc
            finally:
                self._unpark(engine, request_id)
            return transfer

        transfer = self.loop.call(on_loop)
        if not transfer.wait(started + timeout_s - time.monotonic()).finished:
            self.kv.abort(transfer_request_id, "ShipKV deadline")
        if transfer.poll() is not TransferState.DONE:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE,
                               f"KV transfer to {dst_worker} failed: {transfer.error}")
        return transfer.bytes, (time.monotonic() - started) * 1000.0

    def _end_waiting(self, engine: LLMEngine, request: DecodeRequest, error: str,
                     abort: bool = False, event: DecodeEvent | None = None) -> None:
        """Drop a request waiting for its KV; its stream ends with an abort, `error`, or
        `event` (a hand-back)."""
        self._waiting_kv.pop(request.request_id, None)
        self._num_waiting_kv = len(self._waiting_kv)
        self.loop.remove_poller(request.request_id)
        # After abort() returns, the receiver never writes into the blocks again.
        self.kv.abort(request.request_id, error)
        engine.release_blocks(request.block_ids)
        request.block_ids = []
        if event is not None:
            self.loop.count_finished("migrated")
            deliver(request, event)
        elif abort:
            self.loop.count_finished("abort")
            deliver(request, DecodeEvent(StepOutput(request.request_id, [], "", True, "abort")))
        else:
            self.loop.count_finished("error")
            deliver(request, DecodeEvent(error=error))

    def fail_in_flight(self, engine: LLMEngine, reason: str) -> int:
        """Every request here ends as lost (end_lost), the engine never consulted again:
        those decoding, those waiting for their KV (its receive aborted), and the parked
        KV of migrated requests is forgotten (their ShipKV fails; the router recomputes)."""
        requests = [*self._waiting_kv.values(), *self._in_engine.values()]
        for request_id in self._waiting_kv:
            self.loop.remove_poller(request_id)
            self.kv.abort(request_id, reason)
        for request_id in self._in_engine:
            self.loop.drop_sink(request_id)
        for request_id in self._parked:
            self.loop.remove_poller(_park_key(request_id))
        self._waiting_kv.clear()
        self._in_engine.clear()
        self._parked.clear()
        self._num_waiting_kv = self._num_parked = 0
        for request in requests:
            end_lost(request, reason)
        return len(requests)

    # ---- a role switch (worker.flip) ------------------------------------------------------
    def abort_in_flight(self) -> int:
        """After a drain that ran out of time: hand every request left back to the router
        without its KV (it recomputes them elsewhere) and free held KV; how many."""
        return self.loop.call(self._hand_back_all)

    def _hand_back_all(self, engine: LLMEngine) -> int:
        count = len(self._parked)
        for request_id in list(self._parked):
            self._unpark(engine, request_id)
        for request in list(self._waiting_kv.values()):
            self._end_waiting(engine, request, "the worker is switching role",
                              event=DecodeEvent(migrate=True))
            count += 1
        for request_id, request in list(self._in_engine.items()):
            self._in_engine.pop(request_id)
            self.loop.drop_sink(request_id)
            if engine.abort(request_id):
                self.loop.count_finished("migrated")
            deliver(request, DecodeEvent(migrate=True))
            count += 1
        return count


def _park_key(request_id: str) -> str:
    return f"parked:{request_id}"
