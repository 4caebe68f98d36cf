"""The router's OpenAI-compatible HTTP API (aiohttp.web, on the router's asyncio loop).

Endpoints:
  POST /v1/completions, POST /v1/chat/completions  streaming (SSE) and not
  GET  /v1/models                                  the served model
  GET  /health                                     200 with a live decode worker ("degraded":
                                                   on a stale view of the workers), else 503
  GET  /metrics                                    the router's Prometheus metrics

A request body becomes a GenerateRequest (router.openai_schema) and runs through the same
RequestPipeline as a gRPC Generate call; its chunks become OpenAI objects
(router.openai_format). Pipeline errors map to HTTP statuses in `_STATUS` (400 invalid,
429 over capacity, 503 no decode worker or draining, 504 deadline). A streamed response
starts (200, text/event-stream) with the request's first chunk, so anything that fails
before it still gets its own status; a failure after it is an SSE `{"error": ...}` event
followed by `[DONE]`. The server cancels a handler whose client disconnects
(handler_cancellation), which aborts the request on its workers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

import grpc
from aiohttp import web

from splitserve.common import request_rules
from splitserve.common.auth import ANONYMOUS, ApiKeys, bearer_token
from splitserve.common.grpc_util import ServiceError
from splitserve.router.metrics import METRICS_CONTENT_TYPE, RouterMetrics
from splitserve.router.openai_format import ResponseBuilder, failure, new_response_id, sse_event
from splitserve.router.openai_schema import OpenAIError, OpenAIRequest, parse_chat, parse_completion
from splitserve.router.service import RequestPipeline, SlowClientError
from splitserve.router.tools import NO_TOOLS_TEMPLATE, template_supports_tools
from splitserve.v1 import router_pb2

log = logging.getLogger(__name__)
_CLIENT = web.RequestKey("client", str)  # the name of the API key a request came with

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Parser = Callable[[Any, str], OpenAIRequest]

_SHUTDOWN_TIMEOUT_S = 2.0  # in-flight handlers get this long at stop (drain() waits longer)
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no"}
# gRPC status of a pipeline error -> (HTTP status, OpenAI error type, error code)
_STATUS: dict[grpc.StatusCode, tuple[int, str, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "over_capacity"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error", "unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error", "deadline_exceeded"),
}


_RETRY_AFTER_S = "1"  # 429 / 503: when a client may try again


def error_response(error: OpenAIError) -> web.Response:
    headers: dict[str, str] = {}
    if error.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    elif error.status in (429, 503):
        headers["Retry-After"] = (str(max(1, math.ceil(error.retry_after_s)))
                                  if error.retry_after_s is not None else _RETRY_AFTER_S)
    return web.json_response(error.body(), status=error.status, headers=headers or None)


class _FirstSamples:
    """n > 1: a prompt's later samples start once its first sample's first chunk is out (or
    it ended). By then the prompt's full blocks are in the prefix cache of the worker that
    computed them, so the siblings reuse them instead of computing the prompt n times."""

    def __init__(self, num_choices: int, n: int) -> None:
        self._n = n
        self._ready = [asyncio.Event() for _ in range(0, num_choices, n)]

    async def wait_turn(self, index: int) -> None:
        if index % self._n:
            await self._ready[index // self._n].wait()

    def went(self, index: int) -> None:
        if index % self._n == 0:
            self._ready[index // self._n].set()


async def _all(runs: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Run every choice; the first to fail cancels the others and its error is raised."""
    pending = list(runs)
    if len(pending) == 1:  # the usual request: no task of its own
        await pending[0]
        return
    tasks = [asyncio.ensure_future(run) for run in pending]
    try:
        for done in asyncio.as_completed(tasks):
            await done
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def service_error(exc: ServiceError) -> OpenAIError:
    status, kind, code = _STATUS.get(exc.code, (500, "server_error", "internal_error"))
    return OpenAIError(exc.message, status=status, type_=kind, code=code,
                       retry_after_s=exc.retry_after_s)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error is an OpenAI error object, with the status it deserves."""
    try:
        return await handler(request)
    except OpenAIError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = "request_too_large" if exc.status == 413 else str(exc.status)
        return error_response(OpenAIError(exc.reason, status=exc.status, code=code))
    except ServiceError as exc:
        return error_response(service_error(exc))


class HttpApi:
    def __init__(self, pipeline: RequestPipeline, metrics: RouterMetrics,
                 max_request_bytes: int = 4 * 1024 * 1024, api_keys: ApiKeys | None = None,
                 public_metrics: bool = False) -> None:
        self._pipeline = pipeline
        self._api_keys = api_keys
        self._public_paths = {"/health", "/metrics"} if public_metrics else {"/health"}
        self._max_request_bytes = max_request_bytes
        self._metrics = metrics
        self._runner: web.AppRunner | None = None
        self._created = int(time.time())
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_errors, self._authenticate],
                              client_max_size=self._max_request_bytes)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model_id:.+}", self._model)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics_text)
        return app

    async def start(self, host: str, port: int) -> int:
        """Serve on host:port (0: ephemeral); returns the bound port."""
        runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None,
                               shutdown_timeout=_SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, host or None, port, reuse_port=False)
        await site.start()
        self.port = int(runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """With API keys configured, every path but the public ones needs a valid key (401
        before the body is read)."""
        if self._api_keys is not None and request.path not in self._public_paths:
            token = bearer_token(request.headers.get("Authorization"))
            client = self._api_keys.identify(token) if token is not None else None
            if client is None:
                log.info("refused an unauthenticated %s %s", request.method, request.path)
                message = ("the API key is not valid" if token is not None else
                           "an API key is required: send 'Authorization: Bearer <key>'")
                raise OpenAIError(message, status=401, code="invalid_api_key")
            request[_CLIENT] = client
        return await handler(request)

    # ---- generation ---------------------------------------------------------------------

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_completion)

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_chat)

    async def _read_json(self, request: web.Request) -> Any:
        """The body as JSON; 413 past max_request_bytes (before reading it, when the client
        declares its length), 400 for anything but a JSON value of bounded nesting."""
        limit = self._max_request_bytes
        if request.content_length is not None and request.content_length > limit:
            raise OpenAIError(f"the request body has {request.content_length} bytes; at most "
                              f"{limit} are accepted", status=413, code="request_too_large")
        raw = await request.read()  # aiohttp stops at client_max_size (413) without a length
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise OpenAIError(f"the request body is not valid JSON: {exc}") from exc
        except RecursionError:
            too_deep = True  # deeper than Python's parser goes
        else:
            too_deep = request_rules.json_depth_exceeds(body)
        if too_deep:
            raise OpenAIError("the request body nests JSON deeper than "
                              f"{request_rules.MAX_JSON_DEPTH} levels")
        return body

    async def _generate(self, request: web.Request, parse: Parser) -> web.StreamResponse:
        self._pipeline.refuse_if_full()  # at overload: 429 before the body is even read
        body = await self._read_json(request)
        model = self._pipeline.state.model
        # On a thread: a large schema takes a grammar compile to check (up to ~0.3 s).
        req = await asyncio.to_thread(parse, body, model.model_id)
        if req.generate.tools and not template_supports_tools(model.tokenizer.chat_template):
            raise OpenAIError(NO_TOOLS_TEMPLATE, param="tools")
        response_id = new_response_id(req.chat)
        generates = req.choice_requests()
        created = int(time.time())
        builders: list[ResponseBuilder] = []
        for index, generate in enumerate(generates):
            generate.request_id = response_id if len(generates) == 1 else f"{response_id}-{index}"
            builders.append(ResponseBuilder(req, model.model_id, model.tokenizer, index,
                                            generate, response_id, created))
        first = _FirstSamples(len(generates), req.n)
        if req.stream:
            return await self._stream(request, req, list(zip(generates, builders, strict=True)),
                                      first)

        async def one(generate: router_pb2.GenerateRequest, builder: ResponseBuilder) -> None:
            final: list[router_pb2.GenerateResponse] = []

            async def collect(chunk: router_pb2.GenerateResponse) -> None:
                first.went(builder.index)
                builder.add(chunk)
                if builder.usage is not None:
                    final.append(chunk)

            await first.wait_turn(builder.index)
            try:
                await self._pipeline.generate(generate, collect,
                                              client=request.get(_CLIENT, ANONYMOUS))
            finally:
                first.went(builder.index)
            error = failure(final[-1]) if final else None
            if error is not None:
                raise error

        try:
            await _all(one(g, b) for g, b in zip(generates, builders, strict=True))
        except OpenAIError as error:
            return error_response(error)
        return web.json_response(builders[0].response(builders))

    async def _stream(
        self, request: web.Request, req: OpenAIRequest,
        choices: list[tuple[router_pb2.GenerateRequest, ResponseBuilder]],
        first: _FirstSamples,
    ) -> web.StreamResponse:
        """Every choice streams into one SSE response, its chunks tagged with its index."""
        response: web.StreamResponse | None = None
        failed = False
        # One event at a time on the wire: choices stream concurrently (n > 1) and a write
        # may wait for the client; one choice's writes come one at a time anyway.
        lock = asyncio.Lock() if len(choices) > 1 else None
        started: set[int] = set()

        async def write(event: bytes) -> None:
            nonlocal response
            if response is None:
                response = web.StreamResponse(headers=_SSE_HEADERS)
                await response.prepare(request)
            await response.write(event)

        async def send(event: bytes) -> None:
            if lock is None:
                await write(event)
                return
            async with lock:
                await write(event)

        async def one(generate: router_pb2.GenerateRequest, builder: ResponseBuilder) -> None:
            nonlocal failed

            async def emit(chunk: router_pb2.GenerateResponse) -> None:
                nonlocal failed
                first.went(builder.index)
                if builder.index not in started:
                    started.add(builder.index)
                    for opening in builder.first_events():
                        await send(sse_event(opening))
                error = failure(chunk)
                if error is not None:
                    failed = True
                    await send(sse_event(error.body()))
                    return
                event = builder.delta_event(chunk)
                if event is not None:
                    await send(event)

            await first.wait_turn(builder.index)
            try:
                await self._pipeline.generate(generate, emit,
                                              client=request.get(_CLIENT, ANONYMOUS))
            except ServiceError as exc:
                if response is None:
                    raise
                failed = True
                await send(sse_event(service_error(exc).body()))
            finally:
                first.went(builder.index)

        builders = [b for _, b in choices]
        try:
            await _all(one(g, b) for g, b in choices)
        except SlowClientError as exc:
            log.info("%s: %s", builders[0].id, exc)
            if request.transport is not None:
                # Drop the connection at once: closing it politely would wait for the same
                # client to read what is buffered, and so would aiohttp's end of response.
                request.transport.abort()
            return response or web.Response(status=499)
        except ConnectionError:
            log.debug("client of %s went away mid-stream", builders[0].id)
            return response or web.Response(status=499)
        if response is None:  # a run that returns has sent its last chunk; never here
            raise OpenAIError("the request ended without output", status=500,
                              type_="server_error", code="internal_error")
        if req.include_usage and not failed and all(b.usage is not None for b in builders):
            await send(sse_event(builders[0].usage_event(builders)))
        await send(sse_event("[DONE]"))
        await response.write_eof()
        return response

    # ---- the rest -----------------------------------------------------------------------

    def _model_card(self) -> dict[str, Any]:
        model = self._pipeline.state.model
        return {"id": model.model_id, "object": "model", "created": self._created,
                "owned_by": "splitserve", "max_model_len": model.max_model_len}

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def _model(self, request: web.Request) -> web.Response:
        """GET /v1/models/{id}: the model, or 404 model_not_found."""
        card = self._model_card()
        wanted = request.match_info["model_id"]
        if wanted != card["id"]:
            raise OpenAIError(f"The model {wanted!r} does not exist; this server serves "
                              f"{card['id']!r}", status=404, param="model",
                              code="model_not_found")
        return web.json_response(card)

    async def _health(self, request: web.Request) -> web.Response:
        """200 "ok" or "degraded" (serving on a stale view of the workers), else 503."""
        directory = self._pipeline.state.directory
        draining = self._pipeline.admission.closed
        body: dict[str, Any] = {"draining": draining}
        try:
            snapshot = await directory.snapshot()
        except ServiceError as exc:
            body.update(status="unavailable", error=exc.message, decode_workers=0,
                        prefill_workers=0)
        else:
            body.update(decode_workers=len(snapshot.decode),
                        prefill_workers=len(snapshot.prefill))
            if not snapshot.decode or draining:
                body["status"] = "unavailable"
            else:
                body["status"] = "degraded" if directory.store_error else "ok"
        if directory.store_error is not None:
            body["cluster_state"] = {"reachable": False, "error": directory.store_error,
                                     "view_age_s": round(directory.view_age_s, 3)}
        else:
            body["cluster_state"] = {"reachable": True}
        return web.json_response(body, status=503 if body["status"] == "unavailable" else 200)

    async def _metrics_text(self, request: web.Request) -> web.Response:
        return web.Response(body=self._metrics.render(),
                            headers={"Content-Type": METRICS_CONTENT_TYPE})
