"""Structured output and tool calling through the OpenAI API, with the official `openai`
client (whose pydantic types check the response shapes): a real router + prefill + decode
workers (prompts long enough to be prefilled remotely, so the prefill worker samples the
first token under the grammar), a random-weight model and the shipped ChatML tools
template (deploy/chat-templates/chatml-tools.jinja)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from tests.http._raw import call
from tests.service.deployment import Deployment, start_deployment

REPO = Path(__file__).resolve().parents[2]
TOOLS_TEMPLATE = REPO / "deploy" / "chat-templates" / "chatml-tools.jinja"
ENGINE = {"num_kv_blocks": 256, "block_size": 8, "max_num_batched_tokens": 256}
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10},
                   "days": {"type": "integer", "minimum": 1, "maximum": 14},
                   "unit": {"enum": ["C", "F"]}},
    "required": ["city", "days", "unit"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather forecast for a city.", "parameters": SCHEMA}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
        "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What will the weather be like in Paris over the next "
                                   "three days? Please answer with a forecast."}]
SAMPLED = {"temperature": 0.9, "max_tokens": 80}


@pytest.fixture(scope="module")
def deployment(tiny_llama: Path) -> Iterator[Deployment]:
    d = start_deployment(str(tiny_llama), 1, 1, engine=ENGINE,
                         router={"http_port": 0, "local_prefill_threshold": 8,
                                 "chat_template": str(TOOLS_TEMPLATE)})
    yield d
    d.stop()


def test_json_schema_response_format_validates(client: openai.OpenAI, model: str) -> None:
    fmt: Any = {"type": "json_schema",
                "json_schema": {"name": "forecast", "schema": SCHEMA, "strict": True}}
    for seed in range(6):
        out = client.chat.completions.create(model=model, messages=ASK,  # type: ignore[arg-type]
                                             response_format=fmt, seed=seed, **SAMPLED)
        choice = out.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content or ""), SCHEMA)


def test_streamed_structured_output_validates(client: openai.OpenAI, model: str) -> None:
    stream = client.chat.completions.create(
        model=model, messages=ASK, stream=True, seed=11,  # type: ignore[arg-type]
        response_format={"type": "json_schema",  # type: ignore[arg-type]
                         "json_schema": {"name": "f", "schema": SCHEMA}}, **SAMPLED)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_completions_accept_vllm_spellings(client: openai.OpenAI, model: str) -> None:
    prompt = "The answer to the question, written as a code, is"
    out = client.completions.create(model=model, prompt=prompt, n=3, seed=1, **SAMPLED,
                                    extra_body={"guided_regex": r"[A-Z]{2}-[0-9]{3}"})
    assert all(re.fullmatch(r"[A-Z]{2}-[0-9]{3}", c.text) for c in out.choices), out.choices
    out = client.completions.create(
        model=model, prompt=prompt, seed=2, **SAMPLED,
        extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe later"]}})
    assert out.choices[0].text in ("yes", "no", "maybe later")
    out = client.completions.create(model=model, prompt=prompt, seed=3, **SAMPLED,
                                    extra_body={"guided_json": SCHEMA})
    jsonschema.validate(json.loads(out.choices[0].text), SCHEMA)


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format"),
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_choice": "yes"}, "guided_choice"),
    ({"guided_regex": "a+", "response_format": {"type": "json_object"}}, "guided_regex"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0]"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "required",
      "response_format": {"type": "json_object"}}, "response_format"),
])
def test_bad_structured_requests_are_400_naming_the_field(deployment: Deployment, model: str,
                                                          body: dict[str, Any],
                                                          param: str) -> None:
    request = {"model": model, "messages": ASK, "max_tokens": 4, **body}
    status, data, _, _ = call(deployment, "POST", "/v1/chat/completions",
                              json.dumps(request).encode())
    assert status == 400, data
    assert data["error"]["param"] == param, data


def test_named_tool_choice_returns_a_valid_call(client: openai.OpenAI, model: str) -> None:
    out = client.chat.completions.create(
        model=model, messages=ASK, tools=[WEATHER, TIME], seed=5,  # type: ignore[list-item, arg-type]
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, **SAMPLED)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert len(calls) == 1 and calls[0].type == "function"
    assert calls[0].id.startswith("call_") and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), SCHEMA)


def test_required_tool_choice_without_parallel_calls(client: openai.OpenAI, model: str) -> None:
    for seed in range(3):
        out = client.chat.completions.create(
            model=model, messages=ASK, tools=[WEATHER, TIME],  # type: ignore[list-item]
            tool_choice="required", parallel_tool_calls=False, seed=seed,
            **SAMPLED)  # type: ignore[arg-type]
        calls = out.choices[0].message.tool_calls or []
        assert len(calls) == 1, out.choices[0]
        schema = SCHEMA if calls[0].function.name == "get_weather" \
            else TIME["function"]["parameters"]  # type: ignore[index]
        jsonschema.validate(json.loads(calls[0].function.arguments), schema)


# With tool_choice "auto" the answer is free text that may hold Hermes-style calls; a
# random-weight model never writes one by itself, so a grammar makes it write two.
HERMES = ('start: "Checking. " call call\n'
          'call: "<tool_call>" %json ' + json.dumps({
              "type": "object",
              "properties": {"name": {"const": "get_weather"}, "arguments": SCHEMA},
              "required": ["name", "arguments"], "additionalProperties": False,
              "x-guidance": {"whitespace_flexible": False}})
          + ' "</tool_call>"')


def test_auto_tool_calls_are_parsed_from_text(client: openai.OpenAI, model: str) -> None:
    kwargs: Any = {"model": model, "messages": ASK, "tools": [WEATHER, TIME], "seed": 3,
                   "extra_body": {"structured_outputs": {"grammar": HERMES}},
                   "temperature": 0.9, "max_tokens": 400}
    whole = client.chat.completions.create(**kwargs)
    message = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls", message
    assert message.content == "Checking. "
    calls = message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_weather", "get_weather"]
    for c in calls:
        jsonschema.validate(json.loads(c.function.arguments), SCHEMA)
    # Streamed: content deltas never show the tags; each call arrives whole, indexed.
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    streamed = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert content == "Checking. "
    assert [tc.index for tc in streamed] == [0, 1]
    assert [tc.function.arguments for tc in streamed] == [c.function.arguments for c in calls]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_conversation_with_tool_results(client: openai.OpenAI, model: str) -> None:
    """Assistant tool calls and tool results are rendered by the template (the prompt grows
    by them) and the answer may be plain text again."""
    call_turn = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather",
                      "arguments": json.dumps({"city": "Paris", "days": 3, "unit": "C"})}}]}
    result = {"role": "tool", "tool_call_id": "call_1", "content": '{"forecast": "sunny"}'}
    short = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER],  # type: ignore[list-item, arg-type]
                                           max_tokens=4, temperature=0.0)
    long = client.chat.completions.create(model=model, tools=[WEATHER],  # type: ignore[list-item]
                                          messages=[*ASK, call_turn, result],  # type: ignore[list-item]
                                          max_tokens=4, temperature=0.0)
    assert short.usage and long.usage
    assert long.usage.prompt_tokens > short.usage.prompt_tokens + 20
    assert long.choices[0].message.tool_calls is None


def test_tool_call_shapes_validate_against_the_client_types(deployment: Deployment,
                                                            model: str) -> None:
    """The raw JSON (not the client's lenient parse) validates as OpenAI's pydantic types."""
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    body = {"model": model, "messages": ASK, "tools": [WEATHER], "seed": 2,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            **SAMPLED}
    status, data, _, _ = call(deployment, "POST", "/v1/chat/completions",
                              json.dumps(body).encode())
    assert status == 200, data
    completion = ChatCompletion.model_validate(data, strict=True)
    assert completion.choices[0].message.tool_calls
    status, text, _, _ = call(deployment, "POST", "/v1/chat/completions",
                              json.dumps({**body, "stream": True}).encode())
    assert status == 200
    events = [line[len("data: "):] for line in str(text).splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    chunks = [ChatCompletionChunk.model_validate(json.loads(e), strict=True) for e in events]
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert len(calls) == 1 and calls[0].function and calls[0].function.name == "get_weather"
