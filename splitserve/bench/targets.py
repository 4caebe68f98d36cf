"""Where `splitserve bench serve` sends requests, measured the same way for every engine.

- `grpc://host:port`: SplitServe's router through the SDK (splitserve.client.AsyncClient);
  exact per-chunk token counts, and the server's per-phase timings are kept.
- `http://host:port` (or https, or a full .../v1/completions or .../v1/chat/completions
  URL): any OpenAI-compatible server, streamed over SSE with usage requested.

A target's send() fills the RequestRecord as the stream arrives, stamping every chunk with
the client's clock, so a cancelled or failed request keeps what it saw. It returns normally
for a request the server finished (even with finish reason "error", recorded as a failure)
and raises for transport failures; the runner records those.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable
from typing import Any, Protocol

from splitserve.bench.metrics import RequestRecord
from splitserve.bench.workloads import BenchRequest

Clock = Callable[[], float]  # seconds since the run's start
API_MODES = ("auto", "completions", "chat")
_FAILED_FINISH = ("error", "abort")


class Target(Protocol):
    label: str

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def send(self, request: BenchRequest, record: RequestRecord, clock: Clock
                   ) -> None: ...


@dataclasses.dataclass(frozen=True)
class TargetConfig:
    """How to reach and drive the server under test."""

    url: str
    api: str = "auto"  # auto: prompts -> completions, messages -> chat
    model: str | None = None  # None: the server's first (gRPC: default) model
    temperature: float = 0.0
    api_key: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # merged into each body
    request_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.api not in API_MODES:
            raise ValueError(f"api must be one of {API_MODES}, got {self.api!r}")
        if not self.url.startswith(("grpc://", "http://", "https://")):
            raise ValueError(f"target must start with grpc://, http:// or https://, "
                             f"got {self.url!r}")
        if not self.request_timeout_s > 0:
            raise ValueError("request timeout must be > 0 seconds")

    def use_chat(self, request: BenchRequest) -> bool:
        if self.api == "auto":
            return request.messages is not None
        return self.api == "chat"


def make_target(cfg: TargetConfig) -> Target:
    if cfg.url.startswith("grpc://"):
        return GrpcTarget(cfg)
    return HttpTarget(cfg)


class GrpcTarget:
    """SplitServe over gRPC via the SDK's AsyncClient (one channel for all requests)."""

    def __init__(self, cfg: TargetConfig) -> None:
        self.cfg = cfg
        self.label = cfg.url
        self.address = cfg.url.removeprefix("grpc://").rstrip("/")
        self._client: Any = None

    async def open(self) -> None:
        from splitserve.client import AsyncClient  # gRPC stack only when needed

        # No retries: an UNAVAILABLE is an error here, as it is for the HTTP target, not
        # latency hidden inside TTFT.
        self._client = AsyncClient(self.address, timeout=self.cfg.request_timeout_s,
                                   token=self.cfg.api_key, model=self.cfg.model or "",
                                   max_retries=0)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def send(self, request: BenchRequest, record: RequestRecord, clock: Clock) -> None:
        chat = self.cfg.use_chat(request)
        payload: Any = request.as_messages() if chat else request.as_prompt()
        sampling = {"max_tokens": request.max_tokens, "temperature": self.cfg.temperature,
                    "ignore_eos": request.ignore_eos, **self.cfg.extra}
        stream = self._client.stream(payload, chat=chat, **sampling)
        record.mark_sent(clock())
        last = None
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                record.add_chunk(clock(), len(chunk.token_ids))
                last = chunk
        now = clock()
        if last is None or last.finish_reason is None:
            record.fail(now, "stream ended without a finish reason")
            return
        if last.timings is not None:
            record.server_timings = dataclasses.asdict(last.timings)
        usage = last.usage
        if last.finish_reason in _FAILED_FINISH:
            record.fail(now, f"finish_reason={last.finish_reason}: {last.error_message}")
            return
        record.finish(now, last.finish_reason,
                      None if usage is None else usage.completion_tokens,
                      None if usage is None else usage.prompt_tokens)


def split_endpoint(url: str) -> tuple[str, str | None]:
    """(server base URL, the API a full endpoint URL names or None)."""
    url = url.rstrip("/")
    for suffix, api in (("/v1/chat/completions", "chat"), ("/v1/completions", "completions")):
        if url.endswith(suffix):
            return url.removesuffix(suffix), api
    return url.removesuffix("/v1"), None


class HttpTarget:
    """An OpenAI-compatible server: /v1/completions or /v1/chat/completions, SSE stream."""

    def __init__(self, cfg: TargetConfig) -> None:
        self.cfg = cfg
        self.label = cfg.url
        self.base, self._forced_api = split_endpoint(cfg.url)
        self.model = cfg.model
        self._session: Any = None
        self._fresh: Any = None  # a connection per request, for retries

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.cfg.api_key}"} if self.cfg.api_key else {}

    async def open(self) -> None:
        import aiohttp

        # No connection cap (limit=0): the client must never be the bottleneck.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                              timeout=timeout, read_bufsize=1 << 20)
        self._fresh = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True), timeout=timeout,
            read_bufsize=1 << 20)
        if self.model is None:
            self.model = await self._first_model()

    async def _first_model(self) -> str | None:
        """The first id of GET /v1/models; None (no "model" field sent) when unavailable."""
        try:
            async with self._session.get(f"{self.base}/v1/models", headers=self._headers()
                                         ) as resp:
                if resp.status == 200:
                    data = (await resp.json()).get("data") or []
                    return str(data[0]["id"]) if data else None
        except Exception:  # noqa: BLE001 - any failure: let the server pick its default
            return None
        return None

    async def close(self) -> None:
        for session in (self._session, self._fresh):
            if session is not None:
                await session.close()

    def _body(self, request: BenchRequest, chat: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "max_tokens": request.max_tokens, "temperature": self.cfg.temperature,
            "ignore_eos": request.ignore_eos, "stream": True,
            "stream_options": {"include_usage": True}}
        if self.model:
            body["model"] = self.model
        if chat:
            body["messages"] = request.as_messages()
        else:
            body["prompt"] = request.as_prompt()
        body.update(self.cfg.extra)
        return body

    async def send(self, request: BenchRequest, record: RequestRecord, clock: Clock) -> None:
        chat = (self._forced_api == "chat" if self._forced_api
                else self.cfg.use_chat(request))
        path = "/v1/chat/completions" if chat else "/v1/completions"
        record.mark_sent(clock())
        resp = await self._post(self.base + path, self._body(request, chat), record)
        async with resp:
            if resp.status != 200:
                text = (await resp.text())[:300]
                record.fail(clock(), f"HTTP {resp.status}: {text}")
                return
            state = _SseState(chat)
            # Whatever has arrived, split into lines here: aiohttp's line iterator costs a
            # coroutine and a buffer search per line (two lines an event), and the client's
            # CPU is taken from the cores the server under test runs on.
            rest, ended = b"", False
            async for data in resp.content.iter_any():
                now = clock()
                *lines, rest = (rest + data).split(b"\n")
                for line in lines:
                    if state.feed(line, record, now):
                        ended = True
                        break
                if ended:
                    break
            if not ended and rest:
                state.feed(rest, record, clock())
        now = clock()
        if state.error:
            record.fail(now, state.error)
        elif state.finish_reason in _FAILED_FINISH:
            record.fail(now, f"finish_reason={state.finish_reason}")
        else:
            record.finish(now, state.finish_reason, state.completion_tokens,
                          state.prompt_tokens)


    async def _post(self, url: str, body: dict[str, Any], record: RequestRecord) -> Any:
        """POST, sent once more on a fresh connection when the pooled one was closed before
        any response came (a server may close an idle keep-alive connection just as the
        harness reuses it: that is the harness's race, not a failed request)."""
        import aiohttp

        try:
            return await self._session.post(url, json=body, headers=self._headers())
        except aiohttp.ClientConnectorError:
            raise  # no connection at all (refused, unreachable): the server's failure
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            record.connection_retries += 1
            return await self._fresh.post(url, json=body, headers=self._headers())


class _SseState:
    """Parses one OpenAI SSE stream line by line."""

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.finish_reason: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.error = ""

    def feed(self, raw: bytes, record: RequestRecord, now: float) -> bool:
        """Handle one line; True at the end of the stream ([DONE] or an error event)."""
        line = raw.strip()
        if not line.startswith(b"data:"):  # blank separators, ": comments", "event:" lines
            return False
        data = line[5:].strip()
        if data == b"[DONE]":
            return True
        try:
            event = json.loads(data)
        except ValueError:
            self.error = f"unparseable SSE data: {data[:200]!r}"
            return True
        if event.get("error"):
            error = event["error"]
            self.error = str(error.get("message", error) if isinstance(error, dict) else error)
            return True
        for choice in event.get("choices") or []:
            if self.chat:
                delta = choice.get("delta") or {}
                text = delta.get("content") or delta.get("reasoning_content")
            else:
                text = choice.get("text")
            if text:
                record.add_chunk(now, 1)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        usage = event.get("usage")
        if usage:
            self.prompt_tokens = usage.get("prompt_tokens", self.prompt_tokens)
            self.completion_tokens = usage.get("completion_tokens", self.completion_tokens)
        return False
