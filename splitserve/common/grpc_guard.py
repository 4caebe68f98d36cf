"""What a gRPC server checks before a handler runs: that the request message decodes (and is
not over a per-service size), and, for the services that ask for it, that the caller
presents a valid key.

grpc's own servers log a traceback at ERROR and answer UNKNOWN/INTERNAL when a request
message does not decode. With `GuardInterceptor` (grpc.aio) or `SyncGuardInterceptor`
(thread-pool servers) such a request gets INVALID_ARGUMENT and one INFO log line, and a
request without a valid key for a guarded service gets UNAUTHENTICATED before any handler
work. Streaming-request methods are passed through untouched (SplitServe has none).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc

from splitserve.common import tls
from splitserve.common.auth import ApiKeys, bearer_token

log = logging.getLogger(__name__)


_NOT_DECODED = object()  # what a refused call's handler gets instead of its message


class _Refused:
    """Stands in for a request message that is refused before it reaches the handler."""

    __slots__ = ("code", "message")

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        self.message = message


def _tolerant(deserialize: Callable[[bytes], Any], max_bytes: int | None
              ) -> Callable[[bytes], Any]:
    def deserializer(data: bytes) -> Any:
        if max_bytes is not None and len(data) > max_bytes:
            return _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"the request message has {len(data)} bytes; at most {max_bytes} "
                            "are accepted")
        try:
            return deserialize(data)
        except Exception as exc:  # noqa: BLE001 - any decode failure is the client's
            return _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                            "the request message does not decode as the method's type "
                            f"({type(exc).__name__}: {exc})")

    return deserializer


def _refusal(request: Any, method: str) -> _Refused | None:
    if isinstance(request, _Refused):
        log.info("refused a request to %s: %s", method, request.message)
        return request
    return None


def _guard_behavior(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):
        async def agen(request: Any, context: Any) -> Any:
            if (refused := _refusal(request, method)) is not None:
                await context.abort(refused.code, refused.message)
            async for item in behavior(request, context):
                yield item

        return agen
    if inspect.iscoroutinefunction(behavior):
        async def coro(request: Any, context: Any) -> Any:
            if (refused := _refusal(request, method)) is not None:
                await context.abort(refused.code, refused.message)
            return await behavior(request, context)

        return coro
    if inspect.isgeneratorfunction(behavior):
        def gen(request: Any, context: Any) -> Any:
            if (refused := _refusal(request, method)) is not None:
                context.abort(refused.code, refused.message)
            yield from behavior(request, context)

        return gen

    def plain(request: Any, context: Any) -> Any:
        if (refused := _refusal(request, method)) is not None:
            context.abort(refused.code, refused.message)
        return behavior(request, context)

    return plain


def _with_decode_guard(handler: grpc.RpcMethodHandler, method: str,
                       max_bytes: int | None) -> grpc.RpcMethodHandler:
    if handler.request_streaming or handler.request_deserializer is None:
        return handler
    field = "unary_stream" if handler.response_streaming else "unary_unary"
    return handler._replace(  # type: ignore[attr-defined, no-any-return]
        request_deserializer=_tolerant(handler.request_deserializer, max_bytes),
        **{field: _guard_behavior(getattr(handler, field), method)},
    )


def _denied(handler: grpc.RpcMethodHandler, message: str, aio: bool) -> grpc.RpcMethodHandler:
    code = grpc.StatusCode.UNAUTHENTICATED
    if aio:
        async def deny(request: Any, context: Any) -> Any:
            await context.abort(code, message)
    else:
        def deny(request: Any, context: Any) -> Any:  # type: ignore[misc]
            context.abort(code, message)

    if handler.request_streaming:
        field = "stream_stream" if handler.response_streaming else "stream_unary"
    else:
        field = "unary_stream" if handler.response_streaming else "unary_unary"
    # The refusal never decodes the message: garbage from a caller without credentials must
    # not reach the deserializer (grpc logs its failures as tracebacks at ERROR).
    # (Not None: grpc's thread-pool server takes a None message for a failed decode.)
    ignore_body = {"request_deserializer": (lambda _data: _NOT_DECODED)}
    if not aio and handler.response_streaming:
        def deny_stream(request: Any, context: Any) -> Any:
            context.abort(code, message)
            yield  # pragma: no cover - abort raises

        return handler._replace(  # type: ignore[attr-defined, no-any-return]
            **{field: deny_stream}, **ignore_body)
    return handler._replace(**{field: deny}, **ignore_body)  # type: ignore[attr-defined, no-any-return]


# (keys, service full names): calls to those services need `authorization: Bearer <key>`
# with one of the keys. None keys: the services are open.
GuardRule = tuple[ApiKeys | None, Sequence[str]]


class _Guard:
    """The checks both interceptor flavours run on each call's method and metadata."""

    def __init__(self, rules: Sequence[GuardRule], size_limits: Mapping[str, int]) -> None:
        self._rules = [(keys, tuple(f"/{name}/" for name in services))
                       for keys, services in rules if keys is not None]
        self._limits = [(f"/{name}/", limit) for name, limit in size_limits.items()]

    def auth_error(self, details: grpc.HandlerCallDetails) -> str | None:
        """None when the call may proceed; else why it is refused."""
        method = details.method or ""
        for keys, prefixes in self._rules:
            if not method.startswith(prefixes):
                continue
            metadata = dict(details.invocation_metadata or ())
            token = bearer_token(metadata.get("authorization"))
            if token is None:
                return "credentials are required: send 'authorization: Bearer <key>'"
            if keys.identify(token) is None:
                return "the credentials are not valid"
        return None

    def wrap(self, handler: grpc.RpcMethodHandler | None, details: grpc.HandlerCallDetails,
             aio: bool) -> grpc.RpcMethodHandler | None:
        if handler is None:
            return None
        error = self.auth_error(details)
        if error is not None:
            log.info("refused an unauthenticated call to %s", details.method)
            return _denied(handler, error, aio)
        method = details.method or ""
        limit = next((n for prefix, n in self._limits if method.startswith(prefix)), None)
        return _with_decode_guard(handler, method, limit)


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """For grpc.aio servers (the router). `size_limits`: service full name -> the largest
    request message its methods take (RESOURCE_EXHAUSTED beyond it, before decoding)."""

    def __init__(self, rules: Sequence[GuardRule] = (),
                 size_limits: Mapping[str, int] | None = None) -> None:
        self._guard = _Guard(rules, size_limits or {})

    async def intercept_service(
        self, continuation: Callable[..., Any], handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        return self._guard.wrap(handler, handler_call_details, aio=True)


class SyncGuardInterceptor(grpc.ServerInterceptor):
    """For thread-pool servers (the workers, the standalone cluster-state server)."""

    def __init__(self, rules: Sequence[GuardRule] = (),
                 size_limits: Mapping[str, int] | None = None) -> None:
        self._guard = _Guard(rules, size_limits or {})

    def intercept_service(
        self, continuation: Callable[..., Any], handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        return self._guard.wrap(continuation(handler_call_details), handler_call_details,
                                aio=False)


# ---- the calling side: a bearer token on every call of a channel -------------------------


def _with_token(metadata: Any, token: str) -> list[tuple[str, str]]:
    return [*(metadata or ()), ("authorization", f"Bearer {token}")]


class _SyncCallDetails(grpc.ClientCallDetails):  # type: ignore[misc]
    def __init__(self, base: grpc.ClientCallDetails, token: str) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = _with_token(base.metadata, token)
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


class _SyncBearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_SyncCallDetails(details, self._token), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_SyncCallDetails(details, self._token), request)


def _aio_details(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    return details._replace(metadata=_with_token(details.metadata, token))


# grpc.aio sorts a channel's interceptors by kind and files an object that is of several
# kinds under the first only: one class per kind.
class _AioUnaryBearer(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_aio_details(details, self._token), request)


class _AioStreamBearer(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_stream(self, continuation: Any, details: Any,
                                     request: Any) -> Any:
        return await continuation(_aio_details(details, self._token), request)


def sync_channel(address: str, token: str | None,
                 options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A channel to `address` that sends `token` (if any) on every call: mutual TLS when
    this process has TLS files (`tls.current()`), plaintext otherwise."""
    credentials, tls_options = tls.secure_channel_args(tls.current())
    all_options = [*options, *tls_options]
    channel = (grpc.secure_channel(address, credentials, options=all_options)
               if credentials is not None else grpc.insecure_channel(address, options=all_options))
    return grpc.intercept_channel(channel, _SyncBearer(token)) if token else channel


def aio_channel(address: str, token: str | None,
                options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """The grpc.aio flavour of `sync_channel`."""
    interceptors: list[grpc.aio.ClientInterceptor] = (
        [_AioUnaryBearer(token), _AioStreamBearer(token)] if token else [])
    credentials, tls_options = tls.secure_channel_args(tls.current())
    all_options = [*options, *tls_options]
    if credentials is not None:
        return grpc.aio.secure_channel(address, credentials, options=all_options,
                                       interceptors=interceptors or None)
    return grpc.aio.insecure_channel(address, options=all_options,
                                     interceptors=interceptors or None)
