"""A small OpenAI-compatible streaming server (aiohttp) that stands in for an external engine.

It streams `max_tokens` tokens ("tok0 ", "tok1 ", ...) as SSE events with `token_delay_s`
between them, after `first_token_delay_s`, on /v1/completions and /v1/chat/completions, and
records the request bodies it received. Chunks of `tokens_per_event` tokens, a missing
usage block, HTTP 503s and connections closed without a response can be switched on to
exercise the client's fallbacks.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class FakeOpenAI:
    first_token_delay_s: float = 0.01
    token_delay_s: float = 0.002
    tokens_per_event: int = 1
    send_usage: bool = True
    fail_every: int = 0  # every n-th request gets HTTP 503 (0: never)
    drop_first: int = 0  # the first n requests: the connection closes with no response
    dropped: int = 0
    model: str = "fake-model"
    bodies: list[dict[str, Any]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    authorizations: list[str | None] = field(default_factory=list)  # aligned with bodies
    in_flight: int = 0
    peak_in_flight: int = 0
    port: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None
    _thread: threading.Thread | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._complete)
        app.router.add_post("/v1/chat/completions", self._complete)
        return app

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model}]})

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if self.dropped < self.drop_first:  # a keep-alive connection closing under it
            self.dropped += 1
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        self.bodies.append(body)
        self.paths.append(request.path)
        self.authorizations.append(request.headers.get("Authorization"))
        if self.fail_every and len(self.bodies) % self.fail_every == 0:
            return web.json_response({"error": {"message": "overloaded"}}, status=503)
        chat = request.path.endswith("chat/completions")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            await self._stream(resp, body, chat)
        finally:
            self.in_flight -= 1
        return resp

    async def _stream(self, resp: web.StreamResponse, body: dict[str, Any], chat: bool
                      ) -> None:
        async def event(obj: Any) -> None:
            await resp.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

        if chat:  # role-only first event, as OpenAI sends
            await event({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        n = int(body["max_tokens"])
        await asyncio.sleep(self.first_token_delay_s)
        sent = 0
        while sent < n:
            k = min(self.tokens_per_event, n - sent)
            text = "".join(f"tok{sent + i} " for i in range(k))
            sent += k
            finish = "length" if sent == n else None
            choice = ({"index": 0, "delta": {"content": text}, "finish_reason": finish}
                      if chat else {"index": 0, "text": text, "finish_reason": finish})
            await event({"choices": [choice], "usage": None})
            if sent < n:
                await asyncio.sleep(self.token_delay_s)
        if self.send_usage:
            prompt = (" ".join(m["content"] for m in body["messages"]) if chat
                      else body["prompt"])
            await event({"choices": [], "usage": {
                "prompt_tokens": len(prompt.split()), "completion_tokens": n,
                "total_tokens": len(prompt.split()) + n}})
        await resp.write(b"data: [DONE]\n\n")

    # ---- running it on a background thread's event loop (tests are synchronous)

    def start(self) -> str:
        ready = threading.Event()

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            self._runner = web.AppRunner(self.app())
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            self._loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake OpenAI server did not start")
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        assert self._loop is not None and self._runner is not None and self._thread
        fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
        fut.result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
