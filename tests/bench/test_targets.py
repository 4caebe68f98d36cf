"""Target plumbing without a server: endpoint URLs, API choice, the SSE parser."""

from __future__ import annotations

import json

import pytest

from splitserve.bench.metrics import RequestRecord
from splitserve.bench.targets import (
    GrpcTarget,
    HttpTarget,
    TargetConfig,
    _SseState,
    make_target,
    split_endpoint,
)
from splitserve.bench.workloads import BenchRequest


def test_split_endpoint() -> None:
    assert split_endpoint("http://h:8000") == ("http://h:8000", None)
    assert split_endpoint("http://h:8000/v1/") == ("http://h:8000", None)
    assert split_endpoint("https://h/v1/completions") == ("https://h", "completions")
    assert split_endpoint("http://h:1/v1/chat/completions") == ("http://h:1", "chat")


def test_make_target_and_api_choice() -> None:
    assert isinstance(make_target(TargetConfig("grpc://127.0.0.1:5")), GrpcTarget)
    assert make_target(TargetConfig("grpc://127.0.0.1:5/")).address == "127.0.0.1:5"
    assert isinstance(make_target(TargetConfig("http://x")), HttpTarget)
    with pytest.raises(ValueError):
        TargetConfig("127.0.0.1:5")
    prompt = BenchRequest(prompt="a b")
    chat = BenchRequest(messages=[{"role": "user", "content": "a b"}])
    auto = TargetConfig("http://x")
    assert not auto.use_chat(prompt) and auto.use_chat(chat)
    assert TargetConfig("http://x", api="chat").use_chat(prompt)
    assert not TargetConfig("http://x", api="completions").use_chat(chat)


def test_http_body_fields() -> None:
    target = HttpTarget(TargetConfig("http://x", temperature=0.5, extra={"top_p": 0.9},
                                     model="m"))
    req = BenchRequest(prompt="a b c", max_tokens=7, ignore_eos=False)
    body = target._body(req, chat=True)
    assert body == {"max_tokens": 7, "temperature": 0.5, "ignore_eos": False, "stream": True,
                    "stream_options": {"include_usage": True}, "model": "m",
                    "messages": [{"role": "user", "content": "a b c"}], "top_p": 0.9}
    assert target._body(req, chat=False)["prompt"] == "a b c"


def feed(chat: bool, lines: list[bytes]) -> tuple[_SseState, RequestRecord, int]:
    state, record = _SseState(chat), RequestRecord(index=0)
    consumed = 0
    for i, line in enumerate(lines):
        consumed = i + 1
        if state.feed(line, record, float(i)):
            break
    return state, record, consumed


def data(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n"


def test_sse_chat_stream() -> None:
    lines = [b": keep-alive\n", b"event: message\n",
             data({"choices": [{"delta": {"role": "assistant"}}]}), b"\n",
             data({"choices": [{"delta": {"reasoning_content": "hm"}}]}),
             data({"choices": [{"delta": {"content": "Hi"}, "finish_reason": None}]}),
             data({"choices": [{"delta": {"content": ""}, "finish_reason": "stop"}]}),
             data({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3}}),
             b"data: [DONE]\n", data({"choices": [{"delta": {"content": "late"}}]})]
    state, record, consumed = feed(True, lines)
    assert consumed == 9  # stops at [DONE]
    assert record.chunk_s == [4.0, 5.0] and record.chunk_tokens == [1, 1]
    assert (state.finish_reason, state.prompt_tokens, state.completion_tokens) == ("stop", 9, 3)
    assert state.error == ""


def test_sse_completions_and_error_event() -> None:
    state, record, _ = feed(False, [data({"choices": [{"text": "a", "finish_reason": None}]}),
                                    data({"error": {"message": "boom", "code": 500}})])
    assert record.chunk_tokens == [1] and state.error == "boom"
    state, _, _ = feed(False, [b"data: {not json\n"])
    assert state.error.startswith("unparseable SSE data")


def test_http_target_reads_events_however_the_stream_is_cut() -> None:
    """HttpTarget.send against a real HTTP server whose SSE bytes arrive cut mid-line,
    several events to a write, and CRLF line ends: every token chunk counted once, the
    usage read, nothing after [DONE]."""
    import asyncio

    from aiohttp import web

    events = b"".join(data({"choices": [{"text": f"t{i}", "finish_reason": None}]}) + b"\n"
                      for i in range(20))
    events += data({"choices": [{"text": "", "finish_reason": "length"}]}).replace(b"\n", b"\r\n")
    events += b"\r\n" + data({"choices": [], "usage": {"prompt_tokens": 5,
                                                        "completion_tokens": 20}})
    events += b"\ndata: [DONE]\n\n" + data({"choices": [{"text": "late"}]}) + b"\n"
    cuts = [0, 1, 3, 7, 8, 30, 31, 200, 201, 202, 700, 1500, len(events)]

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for start, end in zip(cuts, cuts[1:], strict=False):
            await response.write(events[start:end])
            await asyncio.sleep(0.005)
        return response

    async def main() -> RequestRecord:
        app = web.Application()
        app.router.add_post("/v1/completions", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        target = HttpTarget(TargetConfig(f"http://127.0.0.1:{port}/v1/completions",
                                         model="m"))
        await target.open()
        record = RequestRecord(index=0)
        try:
            await target.send(BenchRequest(prompt="hi", max_tokens=20), record,
                              asyncio.get_running_loop().time)
        finally:
            await target.close()
            await runner.cleanup()
        return record

    record = asyncio.run(main())
    assert record.ok and record.chunk_tokens == [1] * 20
    assert record.output_tokens == 20 and record.prompt_tokens == 5
