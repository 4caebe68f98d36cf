"""gRPC face of the prefill worker: protobuf in, domain calls, protobuf out."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from splitserve.common.convert.common import (
    layout_from_proto,
    logprobs_to_proto,
    sampling_from_proto,
)
from splitserve.common.grpc_util import PREFILL_ADMITTED
from splitserve.v1 import worker_pb2, worker_pb2_grpc

if TYPE_CHECKING:
    from splitserve.prefill_worker.worker import PrefillWorker


class PrefillServicer(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, worker: PrefillWorker):
        self.worker = worker

    def Prefill(self, request: worker_pb2.PrefillRequest,
                context: grpc.ServicerContext) -> worker_pb2.PrefillResponse:
        from splitserve.prefill_worker.worker import PrefillError

        prompt = list(request.prompt_token_ids)
        try:
            params = sampling_from_proto(request.sampling_params)
            layout = layout_from_proto(request.kv_layout)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if request.decode_num_cached_tokens:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "decode_num_cached_tokens > 0 is not supported: send the whole prompt")
        request_id = request.request_id
        done = False
        if not context.add_callback(lambda: self.worker.abort_later(request_id) if not done
                                    else None):
            context.abort(grpc.StatusCode.CANCELLED, "the caller cancelled before the prefill began")
        try:
            result = self.worker.prefill(
                request_id, prompt, params, request.decode_worker_id,
                list(request.decode_block_ids), layout,
                timeout_s=context.time_remaining(), num_sampled=request.num_sampled,
                dst_endpoint=request.decode_kv_endpoint, priority=request.priority,
                on_admitted=lambda: context.send_initial_metadata((PREFILL_ADMITTED,)),
            )
        except PrefillError as exc:
            context.abort(exc.code, str(exc))
        finally:
            done = True
        response = worker_pb2.PrefillResponse(
            request_id=request_id,
            prefill_worker_id=self.worker.worker_id,
            first_token_id=result.first_token_id,
            num_prompt_tokens=len(prompt),
            num_cached_tokens=result.num_cached_tokens,
            queue_ms=result.queue_ms,
            compute_ms=result.compute_ms,
            kv_transfer_ms=result.kv_transfer_ms,
            kv_transfer_bytes=result.kv_transfer_bytes,
        )
        if result.first_token_logprob is not None:
            response.first_token_logprob.CopyFrom(logprobs_to_proto([result.first_token_logprob])[0])
        return response

    def Abort(self, request: worker_pb2.PrefillAbortRequest,
              context: grpc.ServicerContext) -> worker_pb2.PrefillAbortResponse:
        return worker_pb2.PrefillAbortResponse(found=self.worker.abort(request.request_id))

    def Stats(self, request: worker_pb2.PrefillStatsRequest,
              context: grpc.ServicerContext) -> worker_pb2.PrefillStatsResponse:
        return worker_pb2.PrefillStatsResponse(**self.worker.stats_fields())

    def Drain(self, request: worker_pb2.PrefillDrainRequest,
              context: grpc.ServicerContext) -> worker_pb2.PrefillDrainResponse:
        left = self.worker.drain(request.wait_timeout_ms / 1000.0)
        return worker_pb2.PrefillDrainResponse(num_in_flight_requests=left)


def add_prefill_servicer(server: grpc.Server, worker: PrefillWorker) -> list[str]:
    worker_pb2_grpc.add_PrefillWorkerServicer_to_server(PrefillServicer(worker), server)
    return [worker_pb2.DESCRIPTOR.services_by_name["PrefillWorker"].full_name]
