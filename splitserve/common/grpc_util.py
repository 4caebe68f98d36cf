"""gRPC server plumbing shared by the router and the workers (torch-free, generic).

- `create_server` / `create_aio_server`: a server with sane options (no SO_REUSEPORT, so
  binding a port that is taken fails instead of silently sharing it).
- `add_health_and_reflection`: grpc.health.v1 (every named service SERVING) and server
  reflection, returning a `HealthStatus` to flip to NOT_SERVING when draining.
- `bind`: add a port (mutual TLS when the process has TLS files, see common.tls) and fail
  loudly when it cannot be bound.
- Errors map to status codes in one place: raise `ServiceError(code, message)` (or a
  ValueError for INVALID_ARGUMENT) inside a handler wrapped by `map_errors` (sync) or
  `map_errors_async` (grpc.aio); `status_of` is the mapping itself.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import traceback
from collections.abc import Awaitable, Callable, Sequence
from concurrent import futures
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from splitserve.common import tls

log = logging.getLogger(__name__)

# Options every SplitServe server uses. SO_REUSEPORT would let two processes bind the same
# port and split its traffic; a taken port must be an error instead.
DEFAULT_SERVER_OPTIONS: tuple[tuple[str, Any], ...] = (("grpc.so_reuseport", 0),)

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_Handler = TypeVar("_Handler", bound=Callable[..., Any])


class ServiceError(Exception):
    """An error with the status code the client should see."""

    def __init__(self, code: grpc.StatusCode, message: str,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s  # when a refused client may try again, if known

    def __repr__(self) -> str:
        return f"ServiceError({self.code.name}, {self.message!r})"


# Initial metadata a prefill worker sends once the prompt is in its engine's queue, long
# before its answer: the router counts the prompt on that worker until a load report taken
# after this moment (router.workers.WorkerDirectory.delivered).
PREFILL_ADMITTED = ("splitserve-admitted", "1")


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a handler's exception maps to."""
    if isinstance(exc, ServiceError):
        return exc.code, exc.message
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "timed out"
    if isinstance(exc, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED, str(exc) or "not implemented"
    if isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call):
        # A downstream call failed: pass its code on, naming it as such.
        return exc.code(), f"downstream call failed: {exc.details()}"
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def _log_unexpected(method: Callable[..., Any], exc: BaseException) -> None:
    name = getattr(method, "__qualname__", method)
    if isinstance(exc, ValueError):
        # INVALID_ARGUMENT: the caller's error, as a rule. Where it was raised tells a
        # validation apart from an internal bug that happened to raise a ValueError
        # (visible with --log-level info; every bad request would make a line at warning).
        tb = traceback.extract_tb(exc.__traceback__)
        where = f"{tb[-1].filename}:{tb[-1].lineno}" if tb else "?"
        log.info("%s: INVALID_ARGUMENT, a ValueError raised at %s: %s", name, where, exc)
    elif not isinstance(exc, ServiceError):
        log.exception("%s failed", name, exc_info=exc)


def map_errors(method: _Handler) -> _Handler:
    """Wrap a sync servicer method (unary or streaming): exceptions abort with `status_of`."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - this is the one place errors map to codes
            _log_unexpected(method, exc)
            code, message = status_of(exc)
            context.abort(code, message)

    return wrapper  # type: ignore[return-value]


def map_errors_async(
    method: Callable[..., Awaitable[Any]],
) -> Callable[..., Awaitable[Any]]:
    """Wrap a grpc.aio servicer coroutine (unary, or streaming via `context.write`).

    Cancellation (client gone, deadline) is not an error and propagates untouched.
    """

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AbortError:
            raise  # the handler aborted by itself: its status is already set
        except Exception as exc:  # noqa: BLE001 - this is the one place errors map to codes
            _log_unexpected(method, exc)
            code, message = status_of(exc)
            await context.abort(code, message)

    return wrapper


def service_name(pb2_module: Any, service: str) -> str:
    """Full name of `service` in a generated *_pb2 module, e.g. "splitserve.v1.SplitServe"."""
    return str(pb2_module.DESCRIPTOR.services_by_name[service].full_name)


def create_server(
    max_workers: int = 16,
    options: Sequence[tuple[str, Any]] = DEFAULT_SERVER_OPTIONS,
    thread_name_prefix: str = "rpc",
) -> grpc.Server:
    """A synchronous server on a thread pool (not started, no port yet)."""
    pool = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
    return grpc.server(pool, options=list(options))


def create_aio_server(
    options: Sequence[tuple[str, Any]] = DEFAULT_SERVER_OPTIONS,
    sync_handler_pool: futures.Executor | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> grpc.aio.Server:
    """A grpc.aio server (not started). Call it with the server's event loop running.

    Non-coroutine handlers registered on it (e.g. cluster.remote's ClusterStateServicer)
    run on `sync_handler_pool`; the caller owns the pool and shuts it down after the server.
    """
    return grpc.aio.server(migration_thread_pool=sync_handler_pool, options=list(options),
                           interceptors=list(interceptors))


def bind(server: grpc.Server | grpc.aio.Server, address: str) -> int:
    """Add a port ("host:port", port 0 = ephemeral); returns the bound port. With this
    process's TLS files (`tls.current()`) the port requires mutual TLS."""
    try:
        port = tls.add_port(server, address, tls.current())
    except RuntimeError as exc:  # grpcio >= 1.5x raises instead of returning 0
        raise OSError(f"cannot bind gRPC server to {address}: {exc}") from exc
    if port == 0:
        raise OSError(f"cannot bind gRPC server to {address}")
    return int(port)


class HealthStatus:
    """The health servicer of one server: SERVING / NOT_SERVING per service name.

    Works for sync servers and grpc.aio servers alike; on an aio server call it from the
    server's event loop thread.
    """

    def __init__(self, servicer: Any, service_names: Sequence[str], is_aio: bool) -> None:
        self._servicer = servicer
        self._names = ["", *service_names]  # "" is the server's overall health
        self._is_aio = is_aio
        self._pending: set[asyncio.Task[None]] = set()  # aio setters not yet run
        self.serving = True

    def _set_all(self, status: int, names: Sequence[str] | None) -> None:
        for name in self._names if names is None else names:
            if self._is_aio:
                # The aio servicer's setter is a coroutine (it notifies Watch streams under
                # an asyncio.Condition): it runs on the server's loop at its next iteration.
                task = asyncio.get_running_loop().create_task(self._servicer.set(name, status))
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)
            else:
                self._servicer.set(name, status)

    def set_serving(self, names: Sequence[str] | None = None) -> None:
        """Mark `names` (default: every service and the server) SERVING."""
        self.serving = True
        self._set_all(_SERVING, names)

    def set_not_serving(self, names: Sequence[str] | None = None) -> None:
        """Mark `names` (default: every service and the server) NOT_SERVING (draining)."""
        if names is None:
            self.serving = False
        self._set_all(_NOT_SERVING, names)


def add_health_and_reflection(
    server: grpc.Server | grpc.aio.Server, service_names: Sequence[str]
) -> HealthStatus:
    """Register grpc.health.v1 (every named service and "" SERVING) and reflection.

    `service_names` are full names ("splitserve.v1.DecodeWorker"); health and reflection
    list themselves. Call before the server starts.
    """
    is_aio = isinstance(server, grpc.aio.Server)
    servicer: Any = health.aio.HealthServicer() if is_aio else health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ["", *service_names]:
        # Initial statuses are set directly: the server has no Watch streams yet, and
        # this also works before the aio server's loop runs.
        if is_aio:
            servicer._server_status[name] = _SERVING
        else:
            servicer.set(name, _SERVING)
    reflection.enable_server_reflection(
        (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    return HealthStatus(servicer, service_names, is_aio)
