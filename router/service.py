"""The request pipeline every front end shares, and the SplitServe gRPC servicer on it.

RequestPipeline.generate: a place in admission (RESOURCE_EXHAUSTED at once when over
capacity, UNAVAILABLE while draining: before any tokenizing) -> validate (INVALID_ARGUMENT /
NOT_FOUND) -> an admission slot (queued FIFO) -> RequestRun, under
the router's request_timeout_s, observed by the router's metrics. Errors are ServiceErrors
with gRPC status codes; the gRPC servicer passes them on, the HTTP API (router.http_api)
maps them to HTTP statuses. Cancelling the caller's task (client gone, deadline) makes
RequestRun's cleanup abort the request on its workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator

import grpc

from splitserve.common.auth import ANONYMOUS, ApiKeys, client_name
from splitserve.common.grpc_util import ServiceError, map_errors_async
from splitserve.router.admission import AdmissionClosedError, AdmissionController, OverCapacityError
from splitserve.router.latency import TtftUnmetError
from splitserve.router.metrics import RouterMetrics
from splitserve.router.relay import RequestTrace
from splitserve.router.request import Emit, RequestRun
from splitserve.router.slo import SloUnmetError
from splitserve.router.state import RouterState
from splitserve.router.validation import validate_request
from splitserve.router.write_deadline import WriteDeadline
from splitserve.v1 import router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)


class SlowClientError(ConnectionError):
    """The client stopped reading: one chunk waited client_write_timeout_s to be accepted."""


class RequestPipeline:
    """One request's life on the router, whichever front end it came through."""

    def __init__(
        self, state: RouterState, admission: AdmissionController, metrics: RouterMetrics
    ) -> None:
        self.state = state
        self.admission = admission
        self.metrics = metrics

    async def generate(
        self,
        request: router_pb2.GenerateRequest,
        emit: Emit,
        client_deadline: float | None = None,  # time.monotonic() by which the client gives up
        client: str = ANONYMOUS,  # who asked: the name of its API key (metrics)
    ) -> None:
        """Serve `request`, passing its chunks to `emit`; ServiceError on failure."""
        trace = RequestTrace()
        config, model = self.state.config, self.state.model
        with self._admission_error():
            # At overload the request is refused here, before it is tokenized.
            with self.admission.entry():
                validated = await asyncio.to_thread(
                    validate_request, request, model, config.block_size,
                    config.default_max_tokens,
                )
        timeout_s = config.request_timeout_s
        deadline = _deadline(trace.arrival, timeout_s, client_deadline)
        slo_ms = request.ttft_slo_ms or config.ttft_slo_ms
        validated = dataclasses.replace(validated, ttft_slo_ms=slo_ms or 0, client=client)
        predicted = await self._acquire(deadline, client, request.priority,
                                        validated.prompt_len, slo_ms / 1e3 if slo_ms else None)
        admitted = time.monotonic()
        observer = self.metrics.observer(trace, client)
        admission, metrics = self.admission, self.metrics
        write_timeout_s = config.client_write_timeout_s
        write_deadline = WriteDeadline(write_timeout_s)
        first = True

        async def charged(chunk: router_pb2.GenerateResponse) -> None:
            nonlocal first
            if first and chunk.token_ids:
                first = False
                now = time.monotonic()
                admission.predictor.observe_first_token(now - admitted)
                if predicted is not None:
                    metrics.ttft_prediction_error.observe(abs(now - trace.arrival - predicted))
                if trace.predicted_ttft_s is not None and trace.dispatched is not None:
                    metrics.route_ttft_error.observe(
                        abs(now - trace.dispatched - trace.predicted_ttft_s))
            admission.charge(client, len(chunk.token_ids))  # fair share: service received
            try:
                # A write waits only when the connection's buffers are full: a client that
                # stays that way is cut off, so the decode batch never carries it for long.
                await write_deadline.write(emit, chunk)
            except TimeoutError:
                metrics.slow_clients.inc()
                raise SlowClientError(f"the client read nothing for {write_timeout_s:g} s; "
                                      "its stream was cut off") from None

        try:
            run = RequestRun(self.state, validated, trace, observer.wrap(charged), deadline)
            if timeout_s is None:
                await run.run()
                return
            remaining = trace.arrival + timeout_s - time.monotonic()
            try:
                await asyncio.wait_for(run.run(), max(remaining, 0.001))
            except asyncio.TimeoutError:
                await run.finish_timeout(timeout_s)
        except TtftUnmetError:
            observer.end("rejected")  # refused by latency routing before any worker call
            with self._admission_error():
                raise
        except ServiceError as exc:
            aborted = exc.code == grpc.StatusCode.DEADLINE_EXCEEDED
            observer.end("abort" if aborted else "error")
            raise
        except (asyncio.CancelledError, ConnectionError):
            observer.end("abort")  # the client went away
            raise
        except BaseException:
            observer.end("error")
            raise
        finally:
            write_deadline.close()
            self.admission.predictor.observe_hold(time.monotonic() - admitted)
            self.admission.release()

    def refuse_if_full(self) -> None:
        """ServiceError now if the request would be refused anyway: lets a front end answer
        an overload before it reads or parses the request."""
        with self._admission_error():
            self.admission.check()

    @contextlib.contextmanager
    def _admission_error(self) -> Iterator[None]:
        """Admission refusals as ServiceErrors, counted by reason."""
        rejections = self.metrics.rejections
        try:
            yield
        except OverCapacityError as exc:
            rejections.labels("over_capacity").inc()
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from exc
        except SloUnmetError as exc:
            rejections.labels("slo").inc()
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc),
                               retry_after_s=exc.retry_after_s) from exc
        except TtftUnmetError as exc:
            rejections.labels("slo_route").inc()
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc),
                               retry_after_s=max(0.1, exc.predicted_s - exc.slo_s)) from exc
        except AdmissionClosedError as exc:
            rejections.labels("draining").inc()
            raise ServiceError(grpc.StatusCode.UNAVAILABLE,
                               "router is draining; retry elsewhere") from exc

    async def _acquire(self, deadline: float | None, client: str, priority: int,
                       prompt_tokens: int, ttft_slo_s: float | None) -> float | None:
        """Wait for a slot; the TTFT predicted at arrival (None: not yet measurable)."""
        acquire = self.admission.acquire(client, priority, prompt_tokens, ttft_slo_s)
        try:
            with self._admission_error():
                if deadline is None:
                    return await acquire
                timeout = max(deadline - time.monotonic(), 0.001)
                predicted = await asyncio.wait_for(acquire, timeout)
                # On Python 3.11, wait_for returns the result of an inner await that
                # finished as the cancel landed, and the cancel is lost: the client went
                # away (aiohttp cancels once) and the request would run to the end for
                # nobody. Give the slot back and end here.
                task = asyncio.current_task()
                if task is not None and getattr(task, "cancelling", lambda: 0)():
                    self.admission.release()
                    raise asyncio.CancelledError
                return predicted
        except asyncio.TimeoutError as exc:
            self.metrics.rejections.labels("queue_timeout").inc()
            raise ServiceError(
                grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed while queued in the router"
            ) from exc


class SplitServeServicer(router_pb2_grpc.SplitServeServicer):
    def __init__(self, pipeline: RequestPipeline, api_keys: ApiKeys | None = None) -> None:
        self._pipeline = pipeline
        self._state = pipeline.state
        self._api_keys = api_keys  # checked by the server's guard; here only to name callers

    @map_errors_async
    async def Generate(
        self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> None:
        remaining = context.time_remaining()
        client_deadline = None if remaining is None else time.monotonic() + remaining
        metadata = dict(context.invocation_metadata() or ())
        client = client_name(self._api_keys, metadata.get("authorization"))
        try:
            await self._pipeline.generate(request, context.write, client_deadline, client)
        except SlowClientError as exc:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None

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
    arrival: float, timeout_s: float | None, client_deadline: float | None
) -> float | None:
    """The monotonic time by which the request must end: the earlier of the router's
    request_timeout_s and the client's deadline; None when neither is set."""
    candidates = []
    if timeout_s is not None:
        candidates.append(arrival + timeout_s)
    if client_deadline is not None:
        candidates.append(client_deadline)
    return min(candidates) if candidates else None
