"""Torch-free pieces shared by the sync and async SplitServe clients: errors, assembling a
completion from its chunks, deadlines and the retry rule. Result types live in
`splitserve.common.results`, proto conversion in `splitserve.common.convert.router`.

Nothing here touches a channel; `splitserve.client` owns the RPCs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc

from splitserve.common.outputs import TokenLogprobs
from splitserve.common.results import Chunk, Completion, Timings, Usage

_MAX_BACKOFF_S = 10.0


# ---------------------------------------------------------------- errors


class SplitServeError(Exception):
    """A failed SplitServe call. `code` is the gRPC status (None for client-side failures)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None,
                 details: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.details = details


class DeadlineExceeded(SplitServeError):
    """The call's deadline (`timeout=`) passed before it finished."""


class InvalidRequest(SplitServeError, ValueError):
    """The server rejected the request's input or parameters (INVALID_ARGUMENT)."""


class Overloaded(SplitServeError):
    """The server is over capacity (RESOURCE_EXHAUSTED); retry later."""


class Unavailable(SplitServeError):
    """No server or no live worker (UNAVAILABLE), after the client's retries."""


_ERRORS_BY_CODE: dict[grpc.StatusCode, type[SplitServeError]] = {
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
}


def error_from_rpc(err: grpc.RpcError) -> SplitServeError:
    """Map a failed RPC (sync or aio) to the SDK's exception for its status code."""
    code: grpc.StatusCode = err.code()
    details: str = err.details() or ""
    cls = _ERRORS_BY_CODE.get(code, SplitServeError)
    return cls(f"{code.name}: {details}", code, details)


class CompletionBuilder:
    """Accumulates chunks in arrival order into one Completion."""

    def __init__(self, want_logprobs: bool) -> None:
        self._want_logprobs = want_logprobs
        self._texts: list[str] = []
        self._token_ids: list[int] = []
        self._logprobs: list[TokenLogprobs] = []
        self._request_id = ""
        self._last: Chunk | None = None

    def add(self, chunk: Chunk) -> None:
        if self._last is not None and self._last.finish_reason is not None:
            raise SplitServeError("protocol error: a chunk arrived after the last chunk")
        self._texts.append(chunk.text)
        self._token_ids.extend(chunk.token_ids)
        self._logprobs.extend(chunk.logprobs)
        self._request_id = self._request_id or chunk.request_id
        self._last = chunk

    def build(self) -> Completion:
        last = self._last
        if last is None or last.finish_reason is None:
            raise SplitServeError("protocol error: the stream ended without a finish_reason")
        return Completion(
            request_id=self._request_id,
            text="".join(self._texts),
            token_ids=self._token_ids,
            finish_reason=last.finish_reason,
            usage=last.usage or Usage(),
            timings=last.timings or Timings(),
            logprobs=self._logprobs if self._want_logprobs else None,
            stop_string=last.stop_string,
            error_message=last.error_message,
        )


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


# ---------------------------------------------------------------- deadlines and retries


def make_deadline(timeout: float | None) -> float | None:
    """Absolute time.monotonic() deadline of a call (None: no deadline)."""
    if timeout is None:
        return None
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    return time.monotonic() + timeout


def remaining_s(deadline: float | None) -> float | None:
    """Seconds left for one attempt; DeadlineExceeded when none are."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("DEADLINE_EXCEEDED: no time left for another attempt",
                               grpc.StatusCode.DEADLINE_EXCEEDED)
    return left


@dataclass(frozen=True)
class RetryPolicy:
    """Retry UNAVAILABLE, only while no chunk has arrived, with exponential backoff."""

    max_retries: int = 3
    backoff_s: float = 0.2

    def __post_init__(self) -> None:
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, got {self.max_retries!r}")
        if not self.backoff_s >= 0:
            raise ValueError(f"retry_backoff_s must be >= 0, got {self.backoff_s}")

    def delay_s(self, err: grpc.RpcError, attempt: int, deadline: float | None) -> float | None:
        """Seconds to wait before retrying after `attempt` (0-based) failed; None: give up.

        Callers ask only for failures that happened before any response chunk arrived.
        """
        if err.code() != grpc.StatusCode.UNAVAILABLE or attempt >= self.max_retries:
            return None
        delay = min(self.backoff_s * 2.0 ** attempt, _MAX_BACKOFF_S)
        if deadline is not None and time.monotonic() + delay >= deadline:
            return None
        return delay
