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


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
def test_logprobs_of_a_character_split_across_tokens(smollm2_dir: Any, chat: bool) -> None:
    """An emoji is three SmolLM2 tokens, each alone not a character. The tokens' texts join
    into the output text (the pieces add "", the last the emoji), text_offset counts true
    characters, chat's bytes rebuild the text, and an alternative with the same text never
    replaces the sampled token's own logprob."""
    from splitserve.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(smollm2_dir)
    text = "\U0001f600ab"
    ids = tokenizer.encode(text)
    assert len(ids) >= 3 and tokenizer.decode(ids[:1]) == "\ufffd"  # (pieces of a character)
    parse = parse_chat if chat else parse_completion
    body = ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 1}
            if chat else {"prompt": "p", "logprobs": 1})
    builder = ResponseBuilder(parse(body, MODEL), MODEL, tokenizer)
    for token_id in ids:  # one chunk per token, as a stream goes; the alternative: itself
        chunk = router_pb2.GenerateResponse(token_ids=[token_id], text="")
        chunk.logprobs.add(token_id=token_id, logprob=-0.1).top_logprobs.add(
            token_id=token_id, logprob=-5.0)
        builder.add(chunk)
    logprobs = builder.choice()["logprobs"]
    if chat:
        content = logprobs["content"]
        assert "".join(e["token"] for e in content) == text
        assert bytes(b for e in content for b in e["bytes"]).decode() == text
        assert [e["logprob"] for e in content] == pytest.approx([-0.1] * len(ids))
    else:
        tokens = logprobs["tokens"]
        assert "".join(tokens) == text
        assert logprobs["text_offset"] == [len("".join(tokens[:i])) for i in range(len(ids))]
        assert logprobs["text_offset"][-1] == 1  # "ab" follows one character (not three)
        for top, token in zip(logprobs["top_logprobs"], logprobs["tokens"], strict=True):
            assert top[token] == pytest.approx(-0.1)  # the sampled one's, not -5.0
