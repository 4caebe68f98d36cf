"""OpenAI request bodies -> the router's GenerateRequest (pure; no I/O).

/v1/completions and /v1/chat/completions bodies are checked field by field and turned into
a `splitserve.v1.GenerateRequest`, which then goes through the same validation and
pipeline as a gRPC Generate call; `n` samples of each prompt of a completions batch are
one GenerateRequest each (`choice_requests`), choice i of prompt p at index p * n + i.
What SplitServe cannot honour (best_of other than n, echo with logprobs, tools, a non-text
response_format, suffix) is an `OpenAIError` (HTTP 400), never silently ignored. Unknown
fields are ignored, as vLLM does. Extensions accepted as vLLM spells them: top_k, min_p,
repetition_penalty, ignore_eos, stop_token_ids, skip_special_tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from splitserve.common import request_rules
from splitserve.common.request_rules import UINT32_MAX
from splitserve.common.sampling_params import MAX_LOGIT_BIAS_ENTRIES
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
        if not token.isdigit() or int(token) >= 2**32:
            raise OpenAIError(f"logit_bias keys must be token ids, got {key!r}",
                              param="logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not -100.0 <= value <= 100.0:
            raise OpenAIError(f"logit_bias values must be numbers in [-100, 100], got "
                              f"{value!r} for {key!r}", param="logit_bias")
        sp.logit_bias[int(token)] = float(value)


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
    stream, include_usage = _stream_options(b)
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
    if b.data.get("tools") or b.data.get("functions"):
        raise OpenAIError("tools and functions are not supported", param="tools")
    b.reject("tool_choice", ("none",), "tools are not supported")
    b.reject("function_call", ("none",), "functions are not supported")
    response_format = b.get("response_format", (Mapping,), "an object")
    if response_format is not None and response_format.get("type") != "text":
        raise OpenAIError("only response_format {'type': 'text'} is supported",
                          param="response_format")
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
    return OpenAIRequest(True, request, stream, include_usage, False, logprobs, n)


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
        if role in ("tool", "function") or message.get("tool_calls"):
            raise OpenAIError("tool messages are not supported", param=f"messages[{i}]")
        if role == "developer":
            role = "system"  # OpenAI's newer name for the system role
        if role not in request_rules.CHAT_ROLES:
            raise OpenAIError(f"messages[{i}].role {role!r} is not a chat role; expected one "
                              f"of {[*request_rules.CHAT_ROLES, 'developer']}",
                              param=f"messages[{i}].role")
        content = b.text(f"messages[{i}].content", _content(message, i))
        out.append(router_pb2.ChatMessage(role=role, content=content))
    return out


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
