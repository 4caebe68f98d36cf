"""OpenAI request bodies -> the router's GenerateRequest (pure; no I/O).

/v1/completions and /v1/chat/completions bodies are checked field by field and turned into
a `splitserve.v1.GenerateRequest`, which then goes through the same validation and
pipeline as a gRPC Generate call; `n` samples of each prompt of a completions batch are
one GenerateRequest each (`choice_requests`), choice i of prompt p at index p * n + i.
Structured output comes as OpenAI's `response_format` (json_object, json_schema) or as
vLLM's `structured_outputs` {json | regex | choice | grammar | json_object} and its older
`guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`; at most one of them.
Chat `tools` go to the chat template; `tool_choice` "required" or a named function turns
into a grammar (router.tools). What SplitServe cannot honour (best_of other than n, echo
with logprobs, suffix, non-text content) is an `OpenAIError` (HTTP 400), never silently
ignored. Unknown fields are ignored, as vLLM does. Extensions accepted as vLLM spells them:
top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids, skip_special_tokens.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from splitserve.common import request_rules
from splitserve.common.convert.common import structured_output_to_proto
from splitserve.common.request_rules import UINT32_MAX
from splitserve.common.sampling_params import MAX_LOGIT_BIAS_ENTRIES
from splitserve.common.stream_pace import resolve_stream_pace
from splitserve.common.structured_output import OutputKind, StructuredOutput
from splitserve.router import tools as tool_rules
from splitserve.router.tools import ToolChoice
from splitserve.v1 import common_pb2, router_pb2

MAX_TOP_LOGPROBS = 20
MAX_CHOICES = 64  # n times the prompts of one request


class OpenAIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 code: str | None = None, type_: str = "invalid_request_error",
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type_
        self.retry_after_s = retry_after_s  # 429 / 503: the Retry-After, when known

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclass(frozen=True)
class OpenAIRequest:
    """A checked OpenAI request: what to generate and how to shape the answer."""

    chat: bool  # /v1/chat/completions (else /v1/completions)
    generate: router_pb2.GenerateRequest
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with usage
    echo: bool  # completions: prefix the prompt to the text
    # None: no logprobs; n >= 0: the sampled token's logprob plus the top n alternatives.
    logprobs: int | None
    n: int = 1  # samples per prompt
    # Completions with a list of prompts: each one's GenerateRequest (`generate` is the
    # first); empty for a single prompt.
    prompts: list[router_pb2.GenerateRequest] = field(default_factory=list)
    # Chat with tools: how the answer may call them (router.tools); None: no tools.
    tool_choice: ToolChoice | None = None

    def choice_requests(self) -> list[router_pb2.GenerateRequest]:
        """One GenerateRequest per choice, in choice-index order. Sample i > 0 of a seeded
        request uses seed + i, so the samples differ and stay reproducible."""
        out = []
        for prompt in self.prompts or [self.generate]:
            for i in range(self.n):
                request = router_pb2.GenerateRequest()
                request.CopyFrom(prompt)
                if i and request.sampling_params.HasField("seed"):
                    request.sampling_params.seed = (request.sampling_params.seed + i) % 2**64
                out.append(request)
        return out


class _Body:
    """Typed access to one JSON object's fields; every mistake names its field."""

    def __init__(self, body: Any) -> None:
        if not isinstance(body, Mapping):
            raise OpenAIError("the request body must be a JSON object")
        self.data = body

    def get(self, name: str, kinds: tuple[type, ...], what: str) -> Any:
        value = self.data.get(name)
        if value is None:
            return None
        # bool is an int in Python; JSON true is never a number here.
        if isinstance(value, bool) and bool not in kinds:
            raise OpenAIError(f"{name} must be {what}, got {value!r}", param=name)
        if not isinstance(value, kinds):
            raise OpenAIError(f"{name} must be {what}, got {value!r}", param=name)
        return value

    def number(self, name: str, low: float, high: float) -> float | None:
        value = self.get(name, (int, float), "a number")
        if value is not None and not low <= value <= high:
            raise OpenAIError(f"{name} must be in [{low:g}, {high:g}], got {value}", param=name)
        return None if value is None else float(value)

    def integer(self, name: str, low: int, high: int | None = None) -> int | None:
        value = self.get(name, (int,), "an integer")
        if value is not None and (value < low or (high is not None and value > high)):
            bound = f"[{low}, {high}]" if high is not None else f">= {low}"
            raise OpenAIError(f"{name} must be {'in ' if high is not None else ''}{bound}, "
                              f"got {value}", param=name)
        return value

    def text(self, name: str, value: str) -> str:
        """`value` (from field `name`) if it is valid Unicode text (no lone surrogates)."""
        try:
            request_rules.check_text(name, value)
        except ValueError as exc:
            raise OpenAIError(str(exc), param=name) from None
        return value

    def flag(self, name: str) -> bool | None:
        return self.get(name, (bool,), "a boolean")

    def reject(self, name: str, allowed: tuple[Any, ...], why: str) -> None:
        value = self.data.get(name)
        if value is not None and value not in allowed:
            raise OpenAIError(f"{name}={value!r} is not supported: {why}", param=name)


def _choices(b: _Body, num_prompts: int = 1) -> int:
    """`n`, bounded with the prompt count by MAX_CHOICES."""
    n = b.integer("n", 1, MAX_CHOICES) or 1
    if n * num_prompts > MAX_CHOICES:
        raise OpenAIError(f"n={n} samples of {num_prompts} prompts make {n * num_prompts} "
                          f"choices; at most {MAX_CHOICES}", param="n")
    return n


def _sampling(b: _Body, request: router_pb2.GenerateRequest, max_tokens: int | None) -> None:
    """The sampling fields both endpoints share."""
    sp = request.sampling_params
    sp.presence_penalty = b.number("presence_penalty", -2.0, 2.0) or 0.0
    sp.frequency_penalty = b.number("frequency_penalty", -2.0, 2.0) or 0.0
    repetition = b.number("repetition_penalty", 0.0, 2.0)
    if repetition is not None:
        if repetition == 0.0:
            raise OpenAIError("repetition_penalty must be > 0", param="repetition_penalty")
        sp.repetition_penalty = repetition
    _logit_bias(b, sp)
    if max_tokens is not None:
        sp.max_tokens = max_tokens
    temperature = b.number("temperature", 0.0, 2.0)
    if temperature is not None:
        sp.temperature = temperature
    top_p = b.number("top_p", 0.0, 1.0)
    if top_p is not None:
        if top_p == 0.0:
            raise OpenAIError("top_p must be > 0", param="top_p")
        sp.top_p = max(top_p, request_rules.MIN_TOP_P)  # never a float32 denormal
    top_k = b.integer("top_k", -1, UINT32_MAX)
    sp.top_k = 0 if top_k in (None, -1) else top_k
    min_p = b.number("min_p", 0.0, 1.0)
    sp.min_p = min_p or 0.0
    seed = b.integer("seed", -(2**63), 2**64 - 1)
    if seed is not None:
        sp.seed = seed % 2**64  # negative seeds (allowed by OpenAI) wrap into uint64
    stop = b.get("stop", (str, list), "a string or a list of strings")
    stops = [stop] if isinstance(stop, str) else stop or []
    if not all(isinstance(s, str) and s for s in stops):
        raise OpenAIError("stop must be non-empty strings", param="stop")
    sp.stop.extend(b.text("stop", s) for s in stops)
    stop_ids = b.get("stop_token_ids", (list,), "a list of token ids") or []
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**32
               for t in stop_ids):
        raise OpenAIError("stop_token_ids must be non-negative integers", param="stop_token_ids")
    sp.stop_token_ids.extend(stop_ids)
    sp.ignore_eos = bool(b.flag("ignore_eos"))
    skip = b.flag("skip_special_tokens")
    if skip is not None:
        sp.skip_special_tokens = skip


def _logit_bias(b: _Body, sp: common_pb2.SamplingParams) -> None:
    """OpenAI's {"token id": bias} map (ids as JSON object keys, so strings)."""
    bias = b.get("logit_bias", (Mapping,), 'an object mapping token ids to numbers')
    if not bias:
        return
    if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise OpenAIError(f"logit_bias has {len(bias)} entries; at most "
                          f"{MAX_LOGIT_BIAS_ENTRIES}", param="logit_bias")
    for key, value in bias.items():
        token = str(key)
        if not (token.isascii() and token.isdigit()) or int(token) >= 2**32:
            raise OpenAIError(f"logit_bias keys must be token ids, got {key!r}",
                              param="logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not -100.0 <= value <= 100.0:
            raise OpenAIError(f"logit_bias values must be numbers in [-100, 100], got "
                              f"{value!r} for {key!r}", param="logit_bias")
        sp.logit_bias[int(token)] = float(value)


_GUIDED = {"guided_json": OutputKind.JSON_SCHEMA, "guided_regex": OutputKind.REGEX,
           "guided_choice": OutputKind.CHOICE, "guided_grammar": OutputKind.GRAMMAR}
_STRUCTURED = {"json": OutputKind.JSON_SCHEMA, "regex": OutputKind.REGEX,
               "choice": OutputKind.CHOICE, "grammar": OutputKind.GRAMMAR,
               "json_object": OutputKind.JSON_OBJECT}


def _structured_output(b: _Body) -> tuple[StructuredOutput, str] | None:
    """The request's grammar and the field it came from, whichever spelling it used."""
    found: list[tuple[StructuredOutput, str]] = []
    response_format = b.get("response_format", (Mapping,), "an object")
    if response_format is not None:
        kind = response_format.get("type")
        if kind == "json_object":
            found.append((StructuredOutput(OutputKind.JSON_OBJECT), "response_format"))
        elif kind == "json_schema":
            spec = response_format.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, Mapping) else None
            if not isinstance(schema, Mapping):
                raise OpenAIError("response_format json_schema needs json_schema.schema, a "
                                  "JSON schema object", param="response_format")
            found.append((StructuredOutput.json_schema(schema), "response_format"))
        elif kind != "text":
            raise OpenAIError(f"response_format type {kind!r} is not one of 'text', "
                              "'json_object', 'json_schema'", param="response_format")
    for name, kind in _GUIDED.items():
        value = b.data.get(name)
        if value is not None:
            found.append((_spec(kind, value, name), name))
    options = b.get("structured_outputs", (Mapping,), "an object")
    for key, value in (options or {}).items():
        if key in _STRUCTURED and value not in (None, False):
            found.append((_spec(_STRUCTURED[key], value, f"structured_outputs.{key}"),
                          "structured_outputs"))
    if len(found) > 1:
        raise OpenAIError("ask for one kind of structured output, got "
                          f"{[field for _, field in found]}", param=found[1][1])
    if not found:
        return None
    spec, name = found[0]
    try:
        spec.validate()
    except ValueError as exc:
        raise OpenAIError(str(exc), param=name) from None
    return spec, name


def _spec(kind: OutputKind, value: Any, name: str) -> StructuredOutput:
    if kind is OutputKind.JSON_OBJECT:
        return StructuredOutput(kind)
    if kind is OutputKind.JSON_SCHEMA:
        if isinstance(value, str):
            return StructuredOutput(kind, value)
        if isinstance(value, Mapping):
            return StructuredOutput.json_schema(value)
    elif kind is OutputKind.CHOICE:
        if isinstance(value, list):
            return StructuredOutput.choice(value)
    elif isinstance(value, str):
        return StructuredOutput(kind, value)
    raise OpenAIError(f"{name} has the wrong type ({type(value).__name__})", param=name)


def _set_structured_output(request: router_pb2.GenerateRequest,
                           spec: StructuredOutput) -> None:
    request.sampling_params.structured_output.CopyFrom(structured_output_to_proto(spec))


def _stream_options(b: _Body) -> tuple[bool, bool]:
    stream = bool(b.flag("stream"))
    options = b.get("stream_options", (Mapping,), "an object")
    if options is not None and not stream:
        raise OpenAIError("stream_options is only allowed with stream=true",
                          param="stream_options")
    include = (options or {}).get("include_usage", False)
    if not isinstance(include, bool):
        raise OpenAIError("stream_options.include_usage must be a boolean",
                          param="stream_options")
    return stream, include


def _model(b: _Body, model_id: str) -> None:
    model = b.get("model", (str,), "a string")
    if model and len(model) > request_rules.MAX_MODEL_NAME_CHARS:
        raise OpenAIError("model name too long", param="model", code="model_not_found",
                          status=404)
    if model and model != model_id:
        raise OpenAIError(f"The model {model!r} does not exist; this server serves "
                          f"{model_id!r}", param="model", code="model_not_found", status=404)


def _priority(b: _Body, request: router_pb2.GenerateRequest) -> None:
    """vLLM's `priority`: the scheduling class, lower first (int32); and SplitServe's
    `ttft_slo_ms`: refuse at once when the predicted TTFT is longer (router.slo)."""
    request.priority = b.integer("priority", -(2**31), 2**31 - 1) or 0
    request.ttft_slo_ms = b.integer("ttft_slo_ms", 0, UINT32_MAX) or 0


def _stream_pace(b: _Body, request: router_pb2.GenerateRequest, stream: bool) -> None:
    """SplitServe's `stream_pace`: deliver a streamed response at this many tokens per
    second, or at a named speed ("reading", ...; common.stream_pace), a paced stream (the
    decode worker gives the steps it saves to other requests)."""
    value = b.data.get("stream_pace")
    if value is None:
        return
    try:
        rate = resolve_stream_pace(value)
    except ValueError as exc:
        raise OpenAIError(str(exc), param="stream_pace") from None
    if rate and not stream:
        raise OpenAIError("stream_pace is only allowed with stream=true",
                          param="stream_pace")
    request.stream_pace_tokens_per_s = rate


def parse_completion(body: Any, model_id: str) -> OpenAIRequest:
    """A /v1/completions body."""
    b = _Body(body)
    request = router_pb2.GenerateRequest()
    _model(b, model_id)
    if b.data.get("suffix"):
        raise OpenAIError("suffix is not supported", param="suffix")
    prompt = b.data.get("prompt")
    batch = (prompt if isinstance(prompt, list) and prompt
             and all(isinstance(p, (str, list)) for p in prompt) else [prompt])
    n = _choices(b, len(batch))
    best_of = b.integer("best_of", 1, MAX_CHOICES)
    if best_of is not None and best_of != n:
        raise OpenAIError(f"best_of={best_of} is not supported: SplitServe returns every "
                          "sample (best_of equal to n, or unset)", param="best_of")
    logprobs = b.integer("logprobs", 0, MAX_TOP_LOGPROBS)
    echo = bool(b.flag("echo"))
    if echo and logprobs is not None:
        raise OpenAIError("echo together with logprobs is not supported", param="echo")
    _sampling(b, request, b.integer("max_tokens", 1, UINT32_MAX))
    _priority(b, request)
    _set_logprobs(request, logprobs)
    structured = _structured_output(b)
    if structured is not None:
        _set_structured_output(request, structured[0])
    stream, include_usage = _stream_options(b)
    _stream_pace(b, request, stream)
    prompts = []
    for one in batch:
        each = router_pb2.GenerateRequest()
        each.CopyFrom(request)
        _set_prompt(b, each, one)
        prompts.append(each)
    return OpenAIRequest(False, prompts[0], stream, include_usage, echo, logprobs, n,
                         prompts if len(prompts) > 1 else [])


def _set_prompt(b: _Body, request: router_pb2.GenerateRequest, prompt: Any) -> None:
    """One completions prompt: text, or a non-empty list of token ids."""
    if isinstance(prompt, str):
        request.prompt = b.text("prompt", prompt)
    elif isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < 2**32 for t in prompt):
            raise OpenAIError("prompt token ids must be non-negative", param="prompt")
        request.token_ids.token_ids.extend(prompt)
    else:
        raise OpenAIError("prompt must be a non-empty string or list of token ids, or a "
                          "list of those", param="prompt")


def parse_chat(body: Any, model_id: str) -> OpenAIRequest:
    """A /v1/chat/completions body."""
    b = _Body(body)
    request = router_pb2.GenerateRequest()
    _model(b, model_id)
    if b.data.get("functions"):
        raise OpenAIError("functions (deprecated) are not supported; use tools",
                          param="functions")
    b.reject("function_call", ("none",), "functions are not supported; use tools")
    structured = _structured_output(b)
    tool_choice = _tools(b, request)
    if structured is not None:
        if tool_choice is not None and tool_choice.mode in ("required", "named"):
            raise OpenAIError("tool_choice 'required' or a named function cannot be combined "
                              "with structured output", param=structured[1])
        _set_structured_output(request, structured[0])
    modalities = b.get("modalities", (list,), "a list")
    if modalities is not None and modalities != ["text"]:
        raise OpenAIError("only the text modality is supported", param="modalities")
    request.messages.messages.extend(_messages(b, b.data.get("messages")))
    max_tokens = b.integer("max_completion_tokens", 1, UINT32_MAX)
    if max_tokens is None:
        max_tokens = b.integer("max_tokens", 1, UINT32_MAX)
    _sampling(b, request, max_tokens)
    _priority(b, request)
    n = _choices(b)
    top = b.integer("top_logprobs", 0, MAX_TOP_LOGPROBS)
    want = b.flag("logprobs")
    if top is not None and not want:
        raise OpenAIError("top_logprobs needs logprobs=true", param="top_logprobs")
    logprobs = (top or 0) if want else None
    _set_logprobs(request, logprobs)
    stream, include_usage = _stream_options(b)
    _stream_pace(b, request, stream)
    return OpenAIRequest(True, request, stream, include_usage, False, logprobs, n,
                         tool_choice=tool_choice)


def _tools(b: _Body, request: router_pb2.GenerateRequest) -> ToolChoice | None:
    """`tools`, `tool_choice` and `parallel_tool_calls`; the grammar of a forced call."""
    defined = b.get("tools", (list,), "a list of tools") or []
    if len(defined) > tool_rules.MAX_TOOLS:  # before building any
        raise OpenAIError(f"at most {tool_rules.MAX_TOOLS} tools, got {len(defined)}",
                          param="tools")
    for i, tool in enumerate(defined):
        request.tools.append(_tool(b, tool, i))
    try:
        tool_rules.check_tools(request.tools)
    except tool_rules.ToolError as exc:
        raise OpenAIError(str(exc), param=exc.param) from None
    names = [t.name for t in request.tools]
    parallel = b.flag("parallel_tool_calls")
    choice = b.data.get("tool_choice")
    if choice is None:
        mode, name = ("auto" if defined else "none"), ""
    elif choice in ("none", "auto", "required"):
        mode, name = choice, ""
    elif (isinstance(choice, Mapping) and choice.get("type") == "function"
          and isinstance(choice.get("function"), Mapping)
          and isinstance(choice["function"].get("name"), str)):
        mode, name = "named", choice["function"]["name"]
        if name not in names:
            raise OpenAIError(f"tool_choice names {name!r}, which is not in tools",
                              param="tool_choice")
    else:
        raise OpenAIError("tool_choice must be 'none', 'auto', 'required' or "
                          "{'type': 'function', 'function': {'name': ...}}", param="tool_choice")
    if mode != "none" and not defined:
        raise OpenAIError(f"tool_choice {mode!r} needs tools", param="tool_choice")
    if not defined:
        return None
    tool_choice = ToolChoice(mode, name, parallel is not False)
    grammar = tool_rules.forced_call_grammar(list(request.tools), tool_choice)
    if grammar is not None:
        try:
            grammar.validate()
        except ValueError as exc:
            raise OpenAIError(f"tools: {exc}", param="tools") from None
        _set_structured_output(request, grammar)
    return tool_choice


def _tool(b: _Body, tool: Any, i: int) -> router_pb2.Tool:
    where = f"tools[{i}]"
    function = tool.get("function") if isinstance(tool, Mapping) else None
    if not isinstance(tool, Mapping) or tool.get("type") != "function" \
            or not isinstance(function, Mapping):
        raise OpenAIError(f"{where} must be {{'type': 'function', 'function': {{...}}}}",
                          param=where)
    name = function.get("name")
    if not isinstance(name, str):
        raise OpenAIError(f"{where}.function.name must be a string", param=where)
    description = function.get("description") or ""
    if not isinstance(description, str):
        raise OpenAIError(f"{where}.function.description must be a string", param=where)
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, Mapping):
        raise OpenAIError(f"{where}.function.parameters must be a JSON schema object",
                          param=where)
    return router_pb2.Tool(name=b.text(where, name), description=b.text(where, description),
                           parameters=json.dumps(parameters) if parameters else "")


def _set_logprobs(request: router_pb2.GenerateRequest, logprobs: int | None) -> None:
    if logprobs is not None:
        request.sampling_params.logprobs = True
        request.sampling_params.top_logprobs = logprobs


def _messages(b: _Body, messages: Any) -> list[router_pb2.ChatMessage]:
    if not isinstance(messages, list) or not messages:
        raise OpenAIError("messages must be a non-empty list", param="messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise OpenAIError(f"messages[{i}] must be an object with a role",
                              param=f"messages[{i}]")
        role = message["role"]
        if role == "function":
            raise OpenAIError("function messages (deprecated) are not supported; use tool "
                              "messages", param=f"messages[{i}]")
        if role == "developer":
            role = "system"  # OpenAI's newer name for the system role
        if role not in request_rules.CHAT_ROLES:
            raise OpenAIError(f"messages[{i}].role {role!r} is not a chat role; expected one "
                              f"of {[*request_rules.CHAT_ROLES, 'developer']}",
                              param=f"messages[{i}].role")
        calls = message.get("tool_calls")
        # An assistant turn that only calls tools has no content.
        empty_ok = role == "assistant" and bool(calls)
        text = "" if empty_ok and message.get("content") is None else _content(message, i)
        turn = router_pb2.ChatMessage(role=role, content=b.text(f"messages[{i}].content", text))
        if calls is not None:
            if role != "assistant" or not isinstance(calls, list):
                raise OpenAIError("tool_calls must be a list, on an assistant message",
                                  param=f"messages[{i}].tool_calls")
            turn.tool_calls.extend(_tool_call(b, call, f"messages[{i}].tool_calls[{j}]")
                                   for j, call in enumerate(calls))
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise OpenAIError("a tool message needs its tool_call_id",
                                  param=f"messages[{i}].tool_call_id")
            turn.tool_call_id = b.text(f"messages[{i}].tool_call_id", call_id)
            if isinstance(message.get("name"), str):
                turn.name = b.text(f"messages[{i}].name", message["name"])
        out.append(turn)
    return out


def _tool_call(b: _Body, call: Any, where: str) -> router_pb2.ToolCall:
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise OpenAIError(f"{where} must be {{'id', 'type': 'function', 'function': "
                          "{'name', 'arguments'}}", param=where)
    arguments = function.get("arguments", "{}")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments)  # some clients send the object itself
    call_id = call.get("id") if isinstance(call.get("id"), str) else ""
    return router_pb2.ToolCall(id=b.text(where, call_id), name=b.text(where, function["name"]),
                               arguments=b.text(where, arguments))


def _content(message: Mapping[str, Any], i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text":
                raise OpenAIError("only text content parts are supported",
                                  param=f"messages[{i}].content")
            text = part.get("text")
            if not isinstance(text, str):
                raise OpenAIError("a text content part needs a string text",
                                  param=f"messages[{i}].content")
            texts.append(text)
        return "".join(texts)
    raise OpenAIError("content must be a string or a list of text parts",
                      param=f"messages[{i}].content")
