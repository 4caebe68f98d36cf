"""SplitServe client SDK: `Client` (blocking) and `AsyncClient` (asyncio) for the router's
public `splitserve.v1.SplitServe` gRPC service.

    with Client("127.0.0.1:50051") as client:
        print(client.generate("Hello", max_tokens=16, temperature=0).text)
        for chunk in client.stream([{"role": "user", "content": "Hi"}], chat=True):
            print(chunk.text, end="", flush=True)

Sampling keyword arguments are SamplingParams fields, validated locally before any RPC
(TypeError for unknown names, ValueError for bad values); `priority=` (an int, lower first)
is the request's scheduling class when the router queues requests, `ttft_slo_ms=` its TTFT
SLO (the router refuses it at once when it predicts a miss), `stream_pace=` a paced stream's
delivery rate (tokens/s, or a named speed such as "reading": common.stream_pace). A call's `timeout` (seconds,
default: the client's) is one deadline for the whole call, retries included. UNAVAILABLE is
retried with exponential backoff only until the first chunk arrives; output is never re-sent.
Leaving a stream early (break, close(), garbage collection) cancels the RPC, which aborts
the request on the server and frees its KV blocks.

With a deployment's mutual TLS on (see common.tls), pass `tls_dir=` (a folder with ca.crt,
tls.crt, tls.key, e.g. from `splitserve certs`) or set SPLITSERVE_TLS_DIR.

Torch-free: importing this module never imports torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncGenerator, Generator
from typing import Any, TextIO

import grpc
import grpc.aio

from splitserve._client_common import (
    CompletionBuilder,
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    RetryPolicy,
    SplitServeError,
    Unavailable,
    auth_metadata,
    error_from_rpc,
    make_deadline,
    remaining_s,
)
from splitserve.common import tls
from splitserve.common.convert.router import (
    chunk_from_proto,
    generate_request_to_proto,
    model_from_proto,
)
from splitserve.common.results import Chunk, Completion, ModelInfo, Timings, Usage
from splitserve.common.stream_pace import resolve_stream_pace
from splitserve.v1 import router_pb2, router_pb2_grpc

__all__ = [
    "AsyncClient", "Chunk", "Client", "Completion", "DeadlineExceeded", "InvalidRequest",
    "ModelInfo", "Overloaded", "SplitServeError", "Timings", "Unavailable", "Usage",
    "stream_to_terminal",
]

Prompt = str | list[int]
Messages = list[dict[str, str]]


class _ClientBase:
    """Settings and request building shared by Client and AsyncClient."""

    def __init__(self, address: str, timeout: float | None, token: str | None,
                 max_retries: int, retry_backoff_s: float, model: str) -> None:
        make_deadline(timeout)  # validates
        self.address = address
        self.timeout = timeout
        self.model = model
        self._retry = RetryPolicy(max_retries, retry_backoff_s)
        self._metadata = auth_metadata(token)

    def _request(self, prompt_or_messages: Prompt | Messages, chat: bool, request_id: str,
                 model: str | None, sampling: dict[str, Any]) -> router_pb2.GenerateRequest:
        """Among `sampling`, `priority` is the request's scheduling class (lower first),
        `ttft_slo_ms` its TTFT SLO (refused at once when the router predicts a miss) and
        `stream_pace` its delivery rate (tokens/s or a named speed; None: not paced)."""
        sampling = dict(sampling)
        pace = resolve_stream_pace(sampling.pop("stream_pace", None))
        scheduling = {name: sampling.pop(name, 0) for name in ("priority", "ttft_slo_ms")}
        low = {"priority": -(2**31), "ttft_slo_ms": 0}
        for name, value in scheduling.items():
            if isinstance(value, bool) or not isinstance(value, int) \
                    or not low[name] <= value < low[name] + 2**32:
                raise ValueError(f"{name} must be a 32-bit integer, got {value!r}")
        request = generate_request_to_proto(prompt_or_messages, chat=chat, sampling=sampling,
                                            request_id=request_id,
                                            model=self.model if model is None else model)
        request.priority = scheduling["priority"]
        request.ttft_slo_ms = scheduling["ttft_slo_ms"]
        request.stream_pace_tokens_per_s = pace
        return request

    def _deadline(self, timeout: float | None) -> float | None:
        return make_deadline(self.timeout if timeout is None else timeout)


def _credentials(credentials: grpc.ChannelCredentials | None, tls_dir: str | None
                 ) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, Any]]]:
    """Explicit `credentials` (checked against the address dialled), else the mutual TLS
    files of `tls_dir` or SPLITSERVE_TLS_DIR (see common.tls), else plaintext."""
    if credentials is not None:
        return credentials, []
    return tls.secure_channel_args(tls.current(tls_dir))


class Client(_ClientBase):
    """Blocking client. Thread-safe: one channel, shared by every call."""

    def __init__(self, address: str = "127.0.0.1:50051", *, timeout: float | None = None,
                 credentials: grpc.ChannelCredentials | None = None, token: str | None = None,
                 tls_dir: str | None = None, max_retries: int = 3,
                 retry_backoff_s: float = 0.2, model: str = "") -> None:
        super().__init__(address, timeout, token, max_retries, retry_backoff_s, model)
        credentials, options = _credentials(credentials, tls_dir)
        self._channel = (grpc.secure_channel(address, credentials, options=options)
                         if credentials is not None else grpc.insecure_channel(address))
        self._stub = router_pb2_grpc.SplitServeStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(self, prompt: Prompt, *, timeout: float | None = None, request_id: str = "",
                 model: str | None = None, **sampling: Any) -> Completion:
        """Complete a text prompt (BOS added) or a list of token ids (used verbatim)."""
        chunks = self.stream(prompt, timeout=timeout, request_id=request_id, model=model,
                             **sampling)
        return _collect(chunks, sampling)

    def chat(self, messages: Messages, *, timeout: float | None = None, request_id: str = "",
             model: str | None = None, **sampling: Any) -> Completion:
        """Complete a conversation, rendered with the model's chat template."""
        chunks = self.stream(messages, chat=True, timeout=timeout, request_id=request_id,
                             model=model, **sampling)
        return _collect(chunks, sampling)

    def stream(self, prompt_or_messages: Prompt | Messages, *, chat: bool = False,
               timeout: float | None = None, request_id: str = "", model: str | None = None,
               **sampling: Any) -> Generator[Chunk, None, None]:
        """Chunks as the server produces them; the RPC starts at the first next()."""
        request = self._request(prompt_or_messages, chat, request_id, model, sampling)
        return self._stream(request, self._deadline(timeout))

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            try:
                response = self._stub.ListModels(router_pb2.ListModelsRequest(),
                                                 timeout=remaining_s(deadline),
                                                 metadata=self._metadata)
                return [model_from_proto(m) for m in response.models]
            except grpc.RpcError as err:
                delay = self._retry.delay_s(err, attempt, deadline)
                if delay is None:
                    raise error_from_rpc(err) from err
            time.sleep(delay)
            attempt += 1

    def _stream(self, request: router_pb2.GenerateRequest, deadline: float | None
                ) -> Generator[Chunk, None, None]:
        call, first = self._start(request, deadline)
        try:
            if first is None:
                return
            yield chunk_from_proto(first)
            for message in call:
                yield chunk_from_proto(message)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err
        finally:
            call.cancel()  # no-op when the stream already ended

    def _start(self, request: router_pb2.GenerateRequest, deadline: float | None
               ) -> tuple[Any, router_pb2.GenerateResponse | None]:
        """Open the Generate stream and read its first chunk, retrying UNAVAILABLE."""
        attempt = 0
        while True:
            call = self._stub.Generate(request, timeout=remaining_s(deadline),
                                       metadata=self._metadata)
            try:
                return call, next(call)
            except StopIteration:
                return call, None
            except grpc.RpcError as err:
                delay = self._retry.delay_s(err, attempt, deadline)
                if delay is None:
                    raise error_from_rpc(err) from err
            except BaseException:  # KeyboardInterrupt while waiting: free the request
                call.cancel()
                raise
            time.sleep(delay)
            attempt += 1


class AsyncClient(_ClientBase):
    """asyncio client (grpc.aio); create and use it inside one running event loop."""

    def __init__(self, address: str = "127.0.0.1:50051", *, timeout: float | None = None,
                 credentials: grpc.ChannelCredentials | None = None, token: str | None = None,
                 tls_dir: str | None = None, max_retries: int = 3,
                 retry_backoff_s: float = 0.2, model: str = "") -> None:
        super().__init__(address, timeout, token, max_retries, retry_backoff_s, model)
        credentials, options = _credentials(credentials, tls_dir)
        self._channel = (grpc.aio.secure_channel(address, credentials, options=options)
                         if credentials is not None else grpc.aio.insecure_channel(address))
        self._stub = router_pb2_grpc.SplitServeStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def generate(self, prompt: Prompt, *, timeout: float | None = None,
                       request_id: str = "", model: str | None = None,
                       **sampling: Any) -> Completion:
        chunks = self.stream(prompt, timeout=timeout, request_id=request_id, model=model,
                             **sampling)
        return await _acollect(chunks, sampling)

    async def chat(self, messages: Messages, *, timeout: float | None = None,
                   request_id: str = "", model: str | None = None,
                   **sampling: Any) -> Completion:
        chunks = self.stream(messages, chat=True, timeout=timeout, request_id=request_id,
                             model=model, **sampling)
        return await _acollect(chunks, sampling)

    def stream(self, prompt_or_messages: Prompt | Messages, *, chat: bool = False,
               timeout: float | None = None, request_id: str = "", model: str | None = None,
               **sampling: Any) -> AsyncGenerator[Chunk, None]:
        """`async for` over chunks; validates now, starts the RPC at the first __anext__.

        `aclose()` cancels the RPC at once; a `break` cancels it when the generator is
        finalized (right away in CPython when nothing else references it).
        """
        request = self._request(prompt_or_messages, chat, request_id, model, sampling)
        return self._stream(request, self._deadline(timeout))

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            try:
                response = await self._stub.ListModels(router_pb2.ListModelsRequest(),
                                                       timeout=remaining_s(deadline),
                                                       metadata=self._metadata)
                return [model_from_proto(m) for m in response.models]
            except grpc.RpcError as err:
                delay = self._retry.delay_s(err, attempt, deadline)
                if delay is None:
                    raise error_from_rpc(err) from err
            await asyncio.sleep(delay)
            attempt += 1

    async def _stream(self, request: router_pb2.GenerateRequest, deadline: float | None
                      ) -> AsyncGenerator[Chunk, None]:
        call, message = await self._start(request, deadline)
        try:
            while message is not None:
                yield chunk_from_proto(message)
                message = _or_none(await call.read())
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err
        finally:
            call.cancel()

    async def _start(self, request: router_pb2.GenerateRequest, deadline: float | None
                     ) -> tuple[Any, router_pb2.GenerateResponse | None]:
        attempt = 0
        while True:
            call = self._stub.Generate(request, timeout=remaining_s(deadline),
                                       metadata=self._metadata)
            try:
                return call, _or_none(await call.read())
            except grpc.RpcError as err:
                delay = self._retry.delay_s(err, attempt, deadline)
                if delay is None:
                    raise error_from_rpc(err) from err
            except BaseException:  # task cancelled while waiting: free the request
                call.cancel()
                raise
            await asyncio.sleep(delay)
            attempt += 1


def _or_none(message: Any) -> router_pb2.GenerateResponse | None:
    return None if message is grpc.aio.EOF else message


def _collect(chunks: Generator[Chunk, None, None], sampling: dict[str, Any]) -> Completion:
    builder = CompletionBuilder(want_logprobs=sampling.get("logprobs") is not None)
    with contextlib.closing(chunks):
        for chunk in chunks:
            builder.add(chunk)
    return builder.build()


async def _acollect(chunks: AsyncGenerator[Chunk, None], sampling: dict[str, Any]
                    ) -> Completion:
    builder = CompletionBuilder(want_logprobs=sampling.get("logprobs") is not None)
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            builder.add(chunk)
    return builder.build()


def stream_to_terminal(client: Client, prompt: Prompt | Messages, chat: bool = False, *,
                       file: TextIO | None = None, stats_file: TextIO | None = None,
                       **sampling: Any) -> Completion:
    """Print text deltas as they arrive (to `file`, default stdout), then one line of client
    measured TTFT / TPOT and the server's timings (to `stats_file`, default stderr)."""
    out = sys.stdout if file is None else file
    stats = sys.stderr if stats_file is None else stats_file
    builder = CompletionBuilder(want_logprobs=sampling.get("logprobs") is not None)
    start = time.perf_counter()
    first_at: float | None = None
    last_at = start
    first_tokens = 0
    chunks = client.stream(prompt, chat=chat, **sampling)
    with contextlib.closing(chunks):
        for chunk in chunks:
            now = time.perf_counter()
            if chunk.token_ids:
                if first_at is None:
                    first_at, first_tokens = now, len(chunk.token_ids)
                last_at = now
            builder.add(chunk)
            if chunk.text:
                out.write(chunk.text)
                out.flush()
    completion = builder.build()
    out.write("\n")
    out.flush()
    ttft_ms = None if first_at is None else (first_at - start) * 1e3
    later_tokens = len(completion.token_ids) - first_tokens
    tpot_ms = ((last_at - first_at) * 1e3 / later_tokens
               if first_at is not None and later_tokens > 0 else None)
    print(format_stats(completion, ttft_ms, tpot_ms), file=stats, flush=True)
    return completion


def format_stats(completion: Completion, ttft_ms: float | None, tpot_ms: float | None) -> str:
    """One line: finish reason, token counts, client TTFT/TPOT, server timings, workers."""
    def ms(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1f} ms"

    t, u = completion.timings, completion.usage
    where = (f"{t.decode_worker_id} (prefilled locally)" if t.prefill_local
             else f"{t.prefill_worker_id or '-'} -> {t.decode_worker_id or '-'}")
    return (f"[{completion.finish_reason}] prompt {u.prompt_tokens} tokens "
            f"({u.cached_tokens} cached), completion {u.completion_tokens} tokens | "
            f"client TTFT {ms(ttft_ms)}, TPOT {ms(tpot_ms)} | "
            f"server TTFT {ms(t.ttft_ms)}, E2E {ms(t.e2e_ms)}, "
            f"router queue {ms(t.router_queue_ms)}, prefill queue {ms(t.prefill_queue_ms)}, "
            f"prefill {ms(t.prefill_compute_ms)}, KV transfer {ms(t.kv_transfer_ms)}, "
            f"decode queue {ms(t.decode_queue_ms)} | workers {where}")
