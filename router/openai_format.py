"""The router's GenerateResponse chunks -> OpenAI response objects and stream chunks.

One `ResponseBuilder` per choice (n samples of each prompt; one for a plain request).
Streaming: `first_events()` once per choice, `delta(chunk)` per chunk, `usage_event()`
last when stream_options.include_usage. Non-streaming: `add(chunk)` per chunk, then
`response(builders)`. Usage counts each prompt once and every choice's completion tokens.
Shapes follow OpenAI's: ids "cmpl-..." / "chatcmpl-...", objects "text_completion",
"chat.completion", "chat.completion.chunk", finish_reason "stop" | "length", usage with
prompt_tokens_details.cached_tokens. A chunk that ends the request with ABORT or ERROR is
not a response: `failure(chunk)` turns it into an error. A chat answer with tools goes
through a router.tool_parser parser: calls become `tool_calls` (stream deltas carry each
whole call once it is complete) and the finish reason "tool_calls".
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from json.encoder import encode_basestring_ascii
from typing import Any

from splitserve.engine.tokenizer import Tokenizer
from splitserve.router.openai_schema import OpenAIError, OpenAIRequest
from splitserve.router.tool_parser import ParsedCall, parser_for
from splitserve.v1 import common_pb2, router_pb2

_FINISH = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length"}
_COMPACT = json.JSONEncoder(separators=(",", ":"))  # json.dumps(.., separators=..), built once
_TEXT_MARK = "\x00text\x00"  # where a text template's text goes (no text holds it encoded)


def sse_event(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data` (an object, as compact JSON, or a string as is)."""
    payload = data if isinstance(data, str) else _COMPACT.encode(data)
    return f"data: {payload}\n\n".encode()


def usage_json(usage: common_pb2.Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def combined_usage(builders: Sequence[ResponseBuilder], n: int) -> dict[str, Any] | None:
    """Usage of a response: each prompt once (choices p * n .. p * n + n - 1 share prompt
    p), every choice's completion tokens."""
    if any(b.usage_proto is None for b in builders):
        return None
    total = common_pb2.Usage()
    for b in builders:
        usage = b.usage_proto
        assert usage is not None
        total.completion_tokens += usage.completion_tokens
        if b.index % n == 0:
            total.prompt_tokens += usage.prompt_tokens
            total.cached_tokens += usage.cached_tokens
    return usage_json(total)


def failure(chunk: router_pb2.GenerateResponse) -> OpenAIError | None:
    """The error a last chunk carries (ABORT: deadline; ERROR: a worker failed), if any."""
    if chunk.finish_reason == common_pb2.FINISH_REASON_ABORT:
        return OpenAIError(chunk.error_message or "request aborted", status=504,
                           type_="timeout_error", code="request_aborted")
    if chunk.finish_reason == common_pb2.FINISH_REASON_ERROR:
        return OpenAIError(chunk.error_message or "generation failed", status=500,
                           type_="server_error", code="generation_failed")
    return None


def new_response_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


class TokenTexts:
    """The text each generated token adds, in order. A token that ends inside a character
    (one piece of a multi-byte character) adds "" and the token that completes it adds
    the whole character: the tokens' texts join into the output text, so logprobs'
    text_offset and bytes stay true (each token decoded alone would read as U+FFFD)."""

    __slots__ = ("_tokenizer", "_pending")

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._pending: list[int] = []  # tokens of a character not complete yet

    def peek(self, token_id: int) -> str:
        """What `token_id` would add here (an alternative at this position); a piece of a
        character alone when it does not complete one."""
        text = self._tokenizer.decode([*self._pending, token_id], skip_special_tokens=False)
        if text.endswith("\ufffd"):
            return self._tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def add(self, token_id: int) -> str:
        """The text the sampled `token_id` adds."""
        ids = [*self._pending, token_id]
        text = self._tokenizer.decode(ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            self._pending = ids
            return ""
        self._pending = []
        return text


class ResponseBuilder:
    def __init__(self, req: OpenAIRequest, model_id: str, tokenizer: Tokenizer,
                 index: int = 0, generate: router_pb2.GenerateRequest | None = None,
                 response_id: str | None = None, created: int | None = None) -> None:
        self._req = req
        self._model = model_id
        self._tokenizer = tokenizer
        self.index = index  # the choice's index in the response
        self._generate = generate if generate is not None else req.generate
        self.id = response_id or new_response_id(req.chat)
        self.created = int(time.time()) if created is None else created
        self.usage_proto: common_pb2.Usage | None = None
        self._texts: list[str] = []
        self._logprobs: list[common_pb2.TokenLogprob] = []
        self._text_offset = 0  # characters of text before the next token (completions)
        self._token_texts = TokenTexts(tokenizer)  # the sampled tokens' texts so far
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self._prompt_text = self._echo_text() if req.echo else ""
        self._parser = (parser_for(req.tool_choice, [t.name for t in self._generate.tools])
                        if req.chat else None)
        self._num_calls = 0  # tool calls streamed so far (their delta index)
        self._text_template: tuple[str, str] | None = None  # see delta_event

    # ---- streaming ----------------------------------------------------------------------

    def first_events(self) -> list[dict[str, Any]]:
        """What precedes the first token: the chat role, or the echoed prompt."""
        if self._req.chat:
            return [self._chunk({"delta": {"role": "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": None})]
        if self._prompt_text:
            self._text_offset = len(self._prompt_text)
            return [self._chunk({"text": self._prompt_text, "logprobs": None,
                                 "finish_reason": None})]
        return []

    def delta(self, chunk: router_pb2.GenerateResponse) -> dict[str, Any] | None:
        """The stream chunk for one GenerateResponse (None when it adds nothing)."""
        self._note_end(chunk)
        finish = _FINISH.get(chunk.finish_reason)
        text, calls = chunk.text, list[ParsedCall]()
        if self._parser is not None:
            text, calls = self._parser.take(chunk.text, final=finish is not None)
            self._num_calls += len(calls)
            finish = self._finish_with_calls(finish, self._num_calls)
        if not text and not calls and not chunk.logprobs and finish is None:
            return None
        logprobs = self._logprobs_json(chunk.logprobs)
        if self._req.chat:
            delta: dict[str, Any] = {"content": text} if text else {}
            if calls:
                first = self._num_calls - len(calls)
                delta["tool_calls"] = [c.json(first + i) for i, c in enumerate(calls)]
            choice: dict[str, Any] = {"delta": delta}
        else:
            choice = {"text": text}
        choice.update(logprobs=logprobs, finish_reason=finish)
        return self._chunk(choice)

    def delta_event(self, chunk: router_pb2.GenerateResponse) -> bytes | None:
        """sse_event(delta(chunk)), or None. Most chunks of a stream are text alone (no
        logprobs, no tool parser, not the last): theirs is a template rendered once with
        the text's JSON string put in, the same bytes for ~a tenth of the CPU."""
        if (self._parser is None and chunk.text and not chunk.logprobs
                and chunk.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED):
            if self._text_template is None:
                self._text_template = self._render_text_template()
            head, tail = self._text_template
            return f"data: {head}{encode_basestring_ascii(chunk.text)}{tail}\n\n".encode()
        event = self.delta(chunk)
        return None if event is None else sse_event(event)

    def _render_text_template(self) -> tuple[str, str]:
        mark = router_pb2.GenerateResponse(text=_TEXT_MARK)
        event = self.delta(mark)
        assert event is not None
        head, _, tail = _COMPACT.encode(event).partition(encode_basestring_ascii(_TEXT_MARK))
        return head, tail

    def _finish_with_calls(self, finish: str | None, num_calls: int) -> str | None:
        """An answer that called tools and ended on its own finishes with "tool_calls"."""
        return "tool_calls" if finish == "stop" and num_calls else finish

    def usage_event(self, builders: Sequence[ResponseBuilder] = ()) -> dict[str, Any]:
        """The last stream event: usage of every choice (`builders`; default this one)."""
        event = self._envelope(chunk=True)
        event.update(choices=[], usage=combined_usage(builders or [self], self._req.n))
        return event

    # ---- whole response -----------------------------------------------------------------

    def add(self, chunk: router_pb2.GenerateResponse) -> None:
        self._note_end(chunk)
        self._texts.append(chunk.text)
        self._logprobs.extend(chunk.logprobs)

    def choice(self) -> dict[str, Any]:
        text = self._prompt_text + "".join(self._texts)
        self._text_offset = len(self._prompt_text)
        self._token_texts = TokenTexts(self._tokenizer)
        logprobs = self._logprobs_json(self._logprobs)
        finish = self.finish_reason
        if self._req.chat:
            calls: list[ParsedCall] = []
            if self._parser is not None:
                text, calls = self._parser.take(text, final=True)
                finish = self._finish_with_calls(finish, len(calls))
            message: dict[str, Any] = {"role": "assistant",
                                       "content": text if text or not calls else None}
            if calls:
                message["tool_calls"] = [c.json() for c in calls]
            choice: dict[str, Any] = {"message": message}
        else:
            choice = {"text": text}
        choice.update(index=self.index, logprobs=logprobs, finish_reason=finish)
        return choice

    def response(self, builders: Sequence[ResponseBuilder] = ()) -> dict[str, Any]:
        """The whole response: every choice (`builders`, in index order; default this one)."""
        builders = builders or [self]
        body = self._envelope(chunk=False)
        body.update(choices=[b.choice() for b in builders],
                    usage=combined_usage(builders, self._req.n))
        return body

    # ---- helpers ------------------------------------------------------------------------

    def _note_end(self, chunk: router_pb2.GenerateResponse) -> None:
        if chunk.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            self.finish_reason = _FINISH.get(chunk.finish_reason)
            self.usage = usage_json(chunk.usage)
            self.usage_proto = chunk.usage

    def _envelope(self, chunk: bool) -> dict[str, Any]:
        if self._req.chat:
            obj = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self._model,
                "system_fingerprint": None}

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        event = self._envelope(chunk=True)
        event["choices"] = [{"index": self.index, **choice}]
        if self._req.include_usage:
            event["usage"] = None
        return event

    def _echo_text(self) -> str:
        gen = self._generate
        if gen.WhichOneof("input") == "prompt":
            return gen.prompt
        return self._tokenizer.decode(list(gen.token_ids.token_ids))

    def _logprobs_json(self, items: Sequence[common_pb2.TokenLogprob]) -> dict[str, Any] | None:
        if self._req.logprobs is None:
            return None
        if self._req.chat:
            return {"content": [self._chat_entry(lp) for lp in items], "refusal": None}
        texts = self._token_texts
        tokens, offsets, top = [], [], []
        for lp in items:
            # Each position's top dict holds its alternatives and the sampled token (as
            # vLLM), the sampled one's own logprob last: an alternative with the same text
            # never replaces it.
            alternatives = {texts.peek(t.token_id): t.logprob for t in lp.top_logprobs}
            token = texts.add(lp.token_id)
            tokens.append(token)
            offsets.append(self._text_offset)
            self._text_offset += len(token)
            top.append({**alternatives, token: lp.logprob})
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in items],
                "top_logprobs": top, "text_offset": offsets}

    def _chat_entry(self, lp: common_pb2.TokenLogprob) -> dict[str, Any]:
        def entry(token: str, logprob: float) -> dict[str, Any]:
            return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

        texts = self._token_texts
        alternatives = [entry(texts.peek(t.token_id), t.logprob) for t in lp.top_logprobs]
        return {**entry(texts.add(lp.token_id), lp.logprob), "top_logprobs": alternatives}
