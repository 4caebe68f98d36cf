"""A decode request's events as DecodeOutput messages: what its Admit stream carries, or
its router's output channel (decode_worker.output_channel) instead."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from splitserve.common.convert.common import FINISH_REASONS, logprobs_to_proto
from splitserve.v1 import common_pb2, worker_pb2

if TYPE_CHECKING:
    from splitserve.decode_worker.worker import DecodeEvent, DecodeRequest


def decode_output(events: Sequence[DecodeEvent], prefilled_locally: bool,
                  output: worker_pb2.DecodeOutput | None = None) -> worker_pb2.DecodeOutput:
    """One message for `events`, in order, up to the first that ends the request (a hand-back,
    an error, the last output), filled into `output` (default: a new one);
    num_generated_tokens and timings are the caller's."""
    if output is None:
        output = worker_pb2.DecodeOutput()
    for event in events:
        if event.lost:  # (its stream fails instead: never sent)
            break
        if event.migrate:  # draining: the router resumes the request elsewhere
            output.finish_reason = common_pb2.FINISH_REASON_ABORT
            output.migrate = True
            output.migrate_kv_tokens = event.kv_tokens
            break
        if event.error is not None:
            output.finish_reason = common_pb2.FINISH_REASON_ERROR
            output.error_message = event.error
            break
        out = event.output
        assert out is not None
        output.token_ids.extend(out.new_token_ids)
        if out.new_logprobs:
            output.logprobs.extend(logprobs_to_proto(out.new_logprobs))
        if prefilled_locally:
            output.num_cached_tokens = out.num_cached_tokens
        if out.finished:
            output.finish_reason = FINISH_REASONS[out.finish_reason or "stop"]
            output.error_message = out.error
            break
    return output


def decode_timings(request: DecodeRequest) -> worker_pb2.DecodeTimings:
    """Where the request's time went on this worker, as of now (its last message's)."""
    now = time.monotonic()
    kv_done = request.kv_done_at or now
    joined = request.joined_at or now
    timings = worker_pb2.DecodeTimings(
        kv_wait_ms=(kv_done - request.admitted_at) * 1000.0,
        decode_queue_ms=max(0.0, joined - kv_done) * 1000.0,
        decode_ms=(now - joined) * 1000.0,
    )
    if request.transfer is not None:
        timings.kv_transfer_bytes = request.transfer.bytes
    return timings
