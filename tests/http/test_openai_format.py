"""router.openai_format's stream events: a text chunk's event from its rendered template is
byte for byte the event of its delta object (pure; no server)."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from splitserve.router.openai_format import ResponseBuilder, sse_event
from splitserve.router.openai_schema import parse_chat, parse_completion
from splitserve.v1 import common_pb2, router_pb2

MODEL = 'tiny "model" \u00e9'
TEXTS = ["hello", " world", "\n", '"quoted" \\ back', "\u00e9\u4e2d\U0001f600", "\x00\x1f\t",
         "\u2028\u2029", "</script>", "a" * 300, "data: x\n\ndata: y"]


def _builders() -> list[ResponseBuilder]:
    bodies: list[tuple[Any, dict[str, Any]]] = [
        (parse_completion, {"prompt": "p", "stream": True}),
        (parse_completion, {"prompt": "p", "stream": True,
                            "stream_options": {"include_usage": True}}),
        (parse_chat, {"messages": [{"role": "user", "content": "hi"}], "stream": True}),
        (parse_chat, {"messages": [{"role": "user", "content": "hi"}], "stream": True,
                      "stream_options": {"include_usage": True}, "n": 2}),
    ]
    return [ResponseBuilder(parse(body, MODEL), MODEL, None, index=i)  # type: ignore[arg-type]
            for i, (parse, body) in enumerate(bodies)]


@pytest.mark.parametrize("builder", _builders(), ids=["completion", "completion-usage", "chat",
                                                      "chat-usage-n2"])
def test_a_text_chunks_event_is_its_delta_objects_event(builder: ResponseBuilder) -> None:
    rng = random.Random(7)
    texts = TEXTS + ["".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0x3000)]))
                             for _ in range(rng.randrange(1, 12))) for _ in range(200)]
    for text in texts:
        chunk = router_pb2.GenerateResponse(token_ids=[1], text=text)
        fast = builder.delta_event(chunk)
        assert fast is not None and fast.startswith(b"data: ") and fast.endswith(b"\n\n")
        assert fast == sse_event(builder.delta(chunk))
        event = json.loads(fast[len(b"data: "):])
        choice = event["choices"][0]
        assert choice.get("text", choice.get("delta", {}).get("content")) == text
        assert choice["index"] == builder.index and event["model"] == MODEL


def test_chunks_beyond_plain_text_take_the_delta_objects_path() -> None:
    """The last chunk, a chunk with logprobs, and an empty one: the general path."""
    builder = _builders()[0]
    last = router_pb2.GenerateResponse(token_ids=[1], text="end",
                                       finish_reason=common_pb2.FINISH_REASON_LENGTH)
    last.usage.prompt_tokens, last.usage.completion_tokens = 3, 4
    event = json.loads(builder.delta_event(last)[len(b"data: "):])  # type: ignore[index]
    assert event["choices"][0]["finish_reason"] == "length"
    assert builder.finish_reason == "length" and builder.usage is not None
    assert builder.delta_event(router_pb2.GenerateResponse(token_ids=[1])) is None
    with_logprobs = router_pb2.GenerateResponse(token_ids=[5], text="x")
    with_logprobs.logprobs.add(token_id=5, logprob=-0.5)
    assert builder.delta_event(with_logprobs) == sse_event(builder.delta(with_logprobs))
