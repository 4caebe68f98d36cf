"""The SplitServe gRPC servicer (grpc.aio): thin; RequestRun does the work.

Generate: validate (INVALID_ARGUMENT / NOT_FOUND) -> admission (RESOURCE_EXHAUSTED when
over capacity, UNAVAILABLE while draining) -> RequestRun, under the router's
request_timeout_s. Client cancellation and the client's deadline cancel the handler;
RequestRun's cleanup then aborts the request on its workers.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from router.admission import AdmissionClosedError, AdmissionController, OverCapacityError
from router.relay import RequestTrace
from router.request import RequestRun
from router.state import RouterState
from router.validation import validate_request
from splitserve.grpc_util import ServiceError, map_errors_async
from splitserve.v1 import router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)


class SplitServeServicer(router_pb2_grpc.SplitServeServicer):
    def __init__(self, state: RouterState, admission: AdmissionController) -> None:
        self._state = state
        self._admission = admission

    @map_errors_async
    async def Generate(
        self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> None:
        trace = RequestTrace()
        if self._admission.closed:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "router is draining; retry elsewhere")
        config, model = self._state.config, self._state.model
        validated = await asyncio.to_thread(
            validate_request, request, model, config.block_size, config.default_max_tokens
        )
        timeout_s = config.request_timeout_s
        deadline = _deadline(trace.arrival, timeout_s, context.time_remaining())
        await self._acquire(deadline)
        try:
            run = RequestRun(self._state, validated, trace, context.write, deadline)
            if timeout_s is None:
                await run.run()
                return
            remaining = trace.arrival + timeout_s - time.monotonic()
            try:
                await asyncio.wait_for(run.run(), max(remaining, 0.001))
            except asyncio.TimeoutError:
                await run.finish_timeout(timeout_s)
        finally:
            self._admission.release()

    async def _acquire(self, deadline: float | None) -> None:
        try:
            if deadline is None:
                await self._admission.acquire()
            else:
                timeout = max(deadline - time.monotonic(), 0.001)
                await asyncio.wait_for(self._admission.acquire(), timeout)
        except OverCapacityError as exc:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from exc
        except AdmissionClosedError as exc:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc
        except asyncio.TimeoutError as exc:
            raise ServiceError(
                grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed while queued in the router"
            ) from exc

    @map_errors_async
    async def ListModels(
        self, request: router_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListModelsResponse:
        model, config = self._state.model, self._state.config
        snapshot = await self._state.directory.snapshot()
        info = router_pb2.ModelInfo(
            id=model.model_id,
            max_model_len=model.max_model_len,
            block_size=config.block_size,
            num_prefill_workers=len(snapshot.prefill),
            num_decode_workers=len(snapshot.decode),
        )
        return router_pb2.ListModelsResponse(models=[info])


def _deadline(
    arrival: float, timeout_s: float | None, client_remaining: float | None
) -> float | None:
    """The monotonic time by which the request must end: the earlier of the router's
    request_timeout_s and the client's deadline; None when neither is set."""
    candidates = []
    if timeout_s is not None:
        candidates.append(arrival + timeout_s)
    if client_remaining is not None:
        candidates.append(time.monotonic() + client_remaining)
    return min(candidates) if candidates else None
