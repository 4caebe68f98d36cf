"""gRPC face of the decode worker: protobuf in, domain calls, protobuf out."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc

from splitserve.common.convert.common import (
    layout_from_proto,
    layout_to_proto,
    sampling_from_proto,
)
from splitserve.common.grpc_util import ServiceError
from splitserve.decode_worker.stream_output import decode_output, decode_timings
from splitserve.v1 import worker_pb2, worker_pb2_grpc

if TYPE_CHECKING:
    from splitserve.decode_worker.worker import DecodeEvent, DecodeRequest, DecodeWorker

_REFUSALS = {
    "no_free_blocks": worker_pb2.ADMIT_REFUSAL_NO_FREE_BLOCKS,
    "draining": worker_pb2.ADMIT_REFUSAL_DRAINING,
    "too_long": worker_pb2.ADMIT_REFUSAL_TOO_LONG,
    "duplicate": worker_pb2.ADMIT_REFUSAL_DUPLICATE_REQUEST_ID,
}
_DEFAULT_PREFILL_TIMEOUT_S = 60.0
_MAX_TOKENS_PER_MESSAGE = 64
# The longest a partial group of --stream-interval tokens is held before it is sent anyway
# (a slow step, a preempted request): what a stream interval may add to a token's arrival.
STREAM_HOLD_S = 0.1
_CHANNEL_POLL_S = 0.5  # an Admit stream whose outputs go over a channel: RPC checks apart


class DecodeServicer(worker_pb2_grpc.DecodeWorkerServicer):
    def __init__(self, worker: DecodeWorker):
        self.worker = worker
        channels = worker.output_channels
        self._output_endpoint = channels.endpoint if channels is not None else ""

    def Admit(self, request: worker_pb2.AdmitRequest,
              context: grpc.ServicerContext) -> Iterator[worker_pb2.AdmitResponse]:
        from splitserve.decode_worker.worker import AdmitRefused

        worker = self.worker
        try:
            params = sampling_from_proto(request.sampling_params)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        timeout_s = (request.prefill_timeout_ms / 1000.0) or _DEFAULT_PREFILL_TIMEOUT_S
        request_id = request.request_id
        # The router may cancel the stream while admit() waits for the engine thread (a
        # cancel storm does): the callback goes in first, and whichever of it and admit()
        # ends second frees what the other left, so the blocks never outlive the stream.
        lock = threading.Lock()
        stream = {"admitted": False, "finished": False, "rpc_done": False}

        def on_rpc_done() -> None:
            with lock:
                stream["rpc_done"] = True
                abort = stream["admitted"] and not stream["finished"]
            if abort:  # the router went away or cancelled: free everything
                # Not waited for: this runs on gRPC's own thread, which serves every call
                # of the server (a wait held them all up for an engine step).
                worker.abort_later(request_id)

        if not context.add_callback(on_rpc_done):
            return  # the RPC already ended: admit nothing
        try:
            admitted = worker.admit(
                request_id, list(request.prompt_token_ids), params,
                request.prefill_locally, request.prefill_worker_id, timeout_s,
                num_sampled=request.num_sampled, priority=request.priority,
                stream_pace_tokens_per_s=request.stream_pace_tokens_per_s,
                client=request.client, output_channel=request.output_channel,
            )
        except AdmitRefused as exc:
            yield worker_pb2.AdmitResponse(admission=worker_pb2.Admission(
                accepted=False, refusal=_REFUSALS[exc.reason], refusal_message=str(exc),
                decode_worker_id=worker.worker_id, output_endpoint=self._output_endpoint,
            ))
            return
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            with lock:
                stream["admitted"] = True
                gone = stream["rpc_done"]
            if gone:  # cancelled while admitting: on_rpc_done already ran and found nothing
                worker.abort(request_id)
                return
            admitted.cancel_stream = context.cancel  # cut off if the router stops reading
            block_ids = list(admitted.block_ids)  # (the engine thread empties it if it expires)
            if not request.prefill_locally and not block_ids:
                # The reservation already ended (its prefill deadline passed while this thread
                # waited): say so, rather than hand the router an admission with no blocks.
                context.abort(grpc.StatusCode.UNAVAILABLE,
                              f"{worker.worker_id}: the reservation expired before it was sent")
            yield worker_pb2.AdmitResponse(admission=worker_pb2.Admission(
                accepted=True,
                decode_worker_id=worker.worker_id,
                block_ids=block_ids,
                kv_layout=layout_to_proto(worker.layout),
                kv_endpoint=worker.kv_endpoint,
                output_channel=admitted.channel is not None,
                output_endpoint=self._output_endpoint,
            ))
            if admitted.channel is not None:  # the outputs go over the router's channel
                while not admitted.ended.wait(_CHANNEL_POLL_S):
                    if not context.is_active():
                        return
                if admitted.lost:  # the worker can no longer serve it: the router resumes it
                    context.abort(grpc.StatusCode.UNAVAILABLE, admitted.lost)
                if admitted.channel_lost:  # (aborted here too: the close may have come first)
                    worker.abort(request_id)
                    context.abort(grpc.StatusCode.UNAVAILABLE, f"{worker.worker_id}: the output "
                                  "channel closed before the request's last output")
                with lock:
                    stream["finished"] = True
                return
            for message in _relay(admitted, context, worker.options.stream_interval):
                if message.output.finish_reason:
                    with lock:
                        stream["finished"] = True
                yield message
        finally:  # however the stream ends: the channel keeps no reference to it
            if admitted.channel is not None:
                admitted.channel.unbind(request_id)

    def PrefillDone(self, request: worker_pb2.PrefillDoneRequest,
                    context: grpc.ServicerContext) -> worker_pb2.PrefillDoneResponse:
        found = self.worker.prefill_done(request.request_id, request.first_token_id)
        return worker_pb2.PrefillDoneResponse(found=found)

    def Abort(self, request: worker_pb2.DecodeAbortRequest,
              context: grpc.ServicerContext) -> worker_pb2.DecodeAbortResponse:
        return worker_pb2.DecodeAbortResponse(found=self.worker.abort(request.request_id))

    def Stats(self, request: worker_pb2.DecodeStatsRequest,
              context: grpc.ServicerContext) -> worker_pb2.DecodeStatsResponse:
        return worker_pb2.DecodeStatsResponse(**self.worker.stats_fields())

    def ShipKV(self, request: worker_pb2.ShipKVRequest,
               context: grpc.ServicerContext) -> worker_pb2.ShipKVResponse:
        try:
            layout = layout_from_proto(request.kv_layout)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        timeout_s = self.worker.options.kv_timeout_s
        remaining = context.time_remaining()
        if remaining is not None:
            timeout_s = max(0.001, min(timeout_s, remaining))
        try:
            nbytes, ms = self.worker.ship_kv(
                request.request_id, request.transfer_request_id, request.dst_worker_id,
                request.dst_kv_endpoint, list(request.dst_block_ids), layout, timeout_s,
            )
        except ServiceError as exc:
            context.abort(exc.code, exc.message)
        return worker_pb2.ShipKVResponse(kv_transfer_bytes=nbytes, kv_transfer_ms=ms)

    def Drain(self, request: worker_pb2.DecodeDrainRequest,
              context: grpc.ServicerContext) -> worker_pb2.DecodeDrainResponse:
        left = self.worker.drain(request.wait_timeout_ms / 1000.0)
        return worker_pb2.DecodeDrainResponse(num_in_flight_requests=left)


def _relay(request: DecodeRequest, context: grpc.ServicerContext, stream_interval: int = 1,
           hold_s: float = STREAM_HOLD_S) -> Iterator[worker_pb2.AdmitResponse]:
    """Stream the request's events, coalescing whatever queued up since the last message;
    with `stream_interval` > 1, after the first message, waiting up to `hold_s` for that
    many tokens (an event that ends the stream is sent at once). A paced stream is never
    grouped: its pace already sets when each token leaves."""
    if request.stream_pace_tokens_per_s > 0:
        stream_interval = 1
    generated = 0
    while context.is_active():
        try:
            events = [request.events.get(timeout=0.5)]
        except queue.Empty:
            continue
        _take_queued(request.events, events)
        if stream_interval > 1 and generated:
            _hold_for_interval(request.events, events, stream_interval, hold_s)
        lost = next((e.lost for e in events if e.lost), "")
        if lost:  # the worker can no longer serve it: the router resumes it elsewhere
            context.abort(grpc.StatusCode.UNAVAILABLE, lost)
        output = decode_output(events, request.prefilled_locally)
        generated += len(output.token_ids)
        output.num_generated_tokens = generated
        if output.finish_reason:
            output.timings.CopyFrom(decode_timings(request))
            yield worker_pb2.AdmitResponse(output=output)
            return
        yield worker_pb2.AdmitResponse(output=output)


def _take_queued(events_queue: queue.Queue[DecodeEvent], events: list[DecodeEvent]) -> None:
    """Append what is queued now, up to _MAX_TOKENS_PER_MESSAGE events in all."""
    while len(events) < _MAX_TOKENS_PER_MESSAGE:
        try:
            events.append(events_queue.get_nowait())
        except queue.Empty:
            return


def _ends_stream(event: DecodeEvent) -> bool:
    return (event.migrate or event.error is not None or bool(event.lost)
            or (event.output is not None and event.output.finished))


def _hold_for_interval(events_queue: queue.Queue[DecodeEvent], events: list[DecodeEvent],
                       stream_interval: int, hold_s: float) -> None:
    """Add queued events to `events` until they carry `stream_interval` tokens, one ends the
    stream, the message is full, or `hold_s` passed."""
    deadline = time.monotonic() + hold_s
    while (len(events) < _MAX_TOKENS_PER_MESSAGE and not any(map(_ends_stream, events))
           and sum(len(e.output.new_token_ids) for e in events if e.output) < stream_interval):
        left = deadline - time.monotonic()
        if left <= 0:
            return
        try:
            events.append(events_queue.get(timeout=left))
        except queue.Empty:
            return
        _take_queued(events_queue, events)


def add_decode_servicer(server: grpc.Server, worker: DecodeWorker) -> list[str]:
    worker_pb2_grpc.add_DecodeWorkerServicer_to_server(DecodeServicer(worker), server)
    return [worker_pb2.DESCRIPTOR.services_by_name["DecodeWorker"].full_name]
