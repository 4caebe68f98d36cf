"""Torch-free pieces shared by the sync and async SplitServe clients: result types, errors,
request building, response conversion and the retry rule.

Nothing here touches a channel; `splitserve.client` owns the RPCs.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from engine.outputs import TokenLogprobs
from engine.sampling_params import SamplingParams
from splitserve.protocol import FINISH_REASON_NAMES, logprobs_from_proto, sampling_to_proto
from splitserve.v1 import common_pb2, router_pb2

# Keyword arguments generate/chat/stream accept as sampling parameters.
SAMPLING_KWARGS = frozenset(f.name for f in dataclasses.fields(SamplingParams)) - {"extra"}
# SamplingParams fields that are `optional` in the proto: sent only when the caller passed
# them, so the router applies its own defaults to the rest (e.g. max_tokens).
_OPTIONAL_PROTO_FIELDS = ("max_tokens", "temperature", "top_p", "seed", "skip_special_tokens")
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


# ---------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of a finished request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from a prefix cache

    @classmethod
    def from_proto(cls, msg: common_pb2.Usage) -> Usage:
        return cls(msg.prompt_tokens, msg.completion_tokens, msg.cached_tokens)


@dataclass(frozen=True, slots=True)
class Timings:
    """Where a request's time went, as the router and workers measured it (milliseconds)."""

    router_queue_ms: float = 0.0
    prefill_queue_ms: float = 0.0
    prefill_compute_ms: float = 0.0
    kv_transfer_ms: float = 0.0
    decode_queue_ms: float = 0.0
    ttft_ms: float = 0.0
    e2e_ms: float = 0.0
    prefill_worker_id: str = ""
    decode_worker_id: str = ""
    prefill_local: bool = False  # the decode worker prefilled the prompt itself
    kv_transfer_bytes: int = 0

    @classmethod
    def from_proto(cls, msg: common_pb2.RequestTimings) -> Timings:
        return cls(**{f.name: getattr(msg, f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One served model, as ListModels reports it."""

    id: str
    max_model_len: int
    block_size: int
    num_prefill_workers: int
    num_decode_workers: int


@dataclass(frozen=True, slots=True)
class Chunk:
    """One streamed piece of a completion: the tokens and text produced since the last one.

    finish_reason, usage and timings are set on the last chunk only.
    """

    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    usage: Usage | None = None
    timings: Timings | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token_ids entry
    request_id: str = ""
    stop_string: str = ""  # with "stop": the stop string that matched
    error_message: str = ""  # with "error": what failed


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole completion, assembled from its chunks."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "abort" | "error"
    usage: Usage
    timings: Timings
    logprobs: list[TokenLogprobs] | None = None  # None unless logprobs= was requested
    stop_string: str = ""
    error_message: str = ""


def chunk_from_proto(msg: router_pb2.GenerateResponse) -> Chunk:
    reason = msg.finish_reason
    return Chunk(
        token_ids=list(msg.token_ids),
        text=msg.text,
        finish_reason=FINISH_REASON_NAMES.get(reason, "error") if reason else None,
        usage=Usage.from_proto(msg.usage) if msg.HasField("usage") else None,
        timings=Timings.from_proto(msg.timings) if msg.HasField("timings") else None,
        logprobs=logprobs_from_proto(msg.logprobs),
        request_id=msg.request_id,
        stop_string=msg.stop_string,
        error_message=msg.error_message,
    )


def model_from_proto(msg: router_pb2.ModelInfo) -> ModelInfo:
    return ModelInfo(msg.id, msg.max_model_len, msg.block_size, msg.num_prefill_workers,
                     msg.num_decode_workers)


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


# ---------------------------------------------------------------- requests


def sampling_to_request_proto(sampling: Mapping[str, Any]) -> common_pb2.SamplingParams:
    """Validate sampling kwargs with SamplingParams and convert them, leaving the proto's
    optional fields the caller did not pass unset. TypeError for unknown names, ValueError
    for bad values."""
    unknown = sorted(set(sampling) - SAMPLING_KWARGS)
    if unknown:
        raise TypeError(f"unknown sampling argument(s) {unknown}; "
                        f"expected some of {sorted(SAMPLING_KWARGS)}")
    try:
        msg = sampling_to_proto(SamplingParams(**sampling))
    except (TypeError, ValueError, OverflowError) as err:  # wrong types, proto ranges
        raise ValueError(f"invalid sampling parameters: {err}") from err
    for name in _OPTIONAL_PROTO_FIELDS:
        if name not in sampling:
            msg.ClearField(name)
    return msg


def _chat_messages(messages: Any) -> router_pb2.ChatMessages:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError("chat messages must be a list of {'role': ..., 'content': ...} dicts")
    turns = []
    for i, m in enumerate(messages):
        if (not isinstance(m, Mapping) or set(m) != {"role", "content"}
                or not all(isinstance(m[k], str) for k in ("role", "content"))):
            raise ValueError(f"chat message {i} must be a dict with exactly the string keys "
                             f"'role' and 'content', got {m!r}")
        turns.append(router_pb2.ChatMessage(role=m["role"], content=m["content"]))
    return router_pb2.ChatMessages(messages=turns)


def build_request(prompt_or_messages: Any, *, chat: bool, sampling: Mapping[str, Any],
                  request_id: str, model: str) -> router_pb2.GenerateRequest:
    """The GenerateRequest for a text prompt, a token-id prompt or (chat=True) messages."""
    params = sampling_to_request_proto(sampling)
    request = router_pb2.GenerateRequest(request_id=request_id, sampling_params=params,
                                         model=model)
    if chat:
        request.messages.CopyFrom(_chat_messages(prompt_or_messages))
    elif isinstance(prompt_or_messages, str):
        request.prompt = prompt_or_messages
    elif isinstance(prompt_or_messages, Sequence) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt_or_messages):
        try:
            request.token_ids.token_ids.extend(prompt_or_messages)
        except ValueError as err:  # negative or > uint32
            raise ValueError(f"invalid prompt token ids: {err}") from err
        request.token_ids.SetInParent()  # an empty list is still the token_ids form
    else:
        raise TypeError("prompt must be a str or a list of token ids (pass chat=True for "
                        f"messages), got {type(prompt_or_messages).__name__}")
    return request


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
