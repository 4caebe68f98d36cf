"""OpenAI compatibility, parameter by parameter, with the official `openai` client: every
parameter SplitServe supports is accepted (200, the shape the client's types expect), and
every one it does not gets a 400 that names it. A real router + prefill + decode worker
in this process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.service.deployment import Deployment, start_deployment

ENGINE = {"num_kv_blocks": 128, "block_size": 8, "max_num_batched_tokens": 256}
PROMPT = "Compatibility is a promise kept one parameter at a time."
MESSAGES = [{"role": "user", "content": "Say something."}]

COMPLETION_OK: list[dict[str, Any]] = [
    {}, {"max_tokens": 3}, {"temperature": 0.0}, {"temperature": 1.7, "seed": 1},
    {"top_p": 0.5}, {"n": 2}, {"n": 2, "best_of": 2}, {"stop": ["\n", "."]}, {"stop": "x"},
    {"seed": -5}, {"logprobs": 3}, {"echo": True}, {"presence_penalty": 1.0},
    {"frequency_penalty": -1.0}, {"logit_bias": {"42": 5, "7": -100}}, {"user": "u-1"},
    {"suffix": None}, {"stream": True}, {"stream": True, "stream_options":
                                          {"include_usage": True}},
    {"extra_body": {"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1,
                    "ignore_eos": True, "stop_token_ids": [2], "skip_special_tokens": False}},
]
CHAT_OK: list[dict[str, Any]] = [
    {}, {"max_completion_tokens": 3}, {"max_tokens": 3}, {"n": 3, "seed": 9},
    {"logprobs": True, "top_logprobs": 2}, {"response_format": {"type": "text"}},
    {"presence_penalty": 0.5, "frequency_penalty": 0.5}, {"logit_bias": {"42": 1}},
    {"stream": True, "n": 2}, {"tool_choice": "none"}, {"user": "u-2"},
    {"messages": [{"role": "developer", "content": "Be brief."}, *MESSAGES]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]},
    {"response_format": {"type": "json_object"}, "max_tokens": 3},
    {"response_format": {"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}},
        "strict": True}}, "max_tokens": 3},
    {"extra_body": {"structured_outputs": {"regex": "[a-z]+"}}, "max_tokens": 3},
    {"extra_body": {"guided_choice": ["yes", "no"]}, "max_tokens": 3},
    {"messages": [*MESSAGES, {"role": "assistant", "content": "Red."},
                  {"role": "tool", "content": "x", "tool_call_id": "1"}]},
]
COMPLETION_BAD: list[tuple[dict[str, Any], str]] = [
    ({"suffix": "end"}, "suffix"), ({"best_of": 3}, "best_of"), ({"n": 100}, "n"),
    ({"echo": True, "logprobs": 1}, "echo"), ({"presence_penalty": 3}, "presence_penalty"),
    ({"logit_bias": {"token": 1}}, "logit_bias"), ({"temperature": 3}, "temperature"),
]
CHAT_BAD: list[tuple[dict[str, Any], str]] = [
    # The tiny model's template (SmolLM2's) does not render tools.
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
     "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"extra_body": {"guided_regex": "[a-"}}, "guided_regex"),
    ({"extra_body": {"modalities": ["audio"]}}, "modalities"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "function", "content": "x", "name": "f"}]}, "messages[0]"),
]


@pytest.fixture(scope="module")
def client(tiny_llama: Path) -> Iterator[tuple[openai.OpenAI, str]]:
    dep: Deployment = start_deployment(str(tiny_llama), 1, 1, engine=ENGINE,
                                       router={"http_port": 0, "local_prefill_threshold": 8})
    try:
        with openai.OpenAI(base_url=f"http://{dep.router.http_address}/v1", api_key="none",
                           max_retries=0, timeout=60) as c:
            yield c, dep.router.model.model_id
    finally:
        dep.stop()


def _consume(result: Any) -> list[Any]:
    """The response's choices (a stream's chunks' choices)."""
    if isinstance(result, openai.Stream):
        return [choice for chunk in result for choice in chunk.choices]
    return list(result.choices)


@pytest.mark.parametrize("kwargs", COMPLETION_OK, ids=lambda k: ",".join(k) or "plain")
def test_completion_parameters_are_accepted(client: tuple[openai.OpenAI, str],
                                            kwargs: dict[str, Any]) -> None:
    c, model = client
    args = {"model": model, "prompt": PROMPT, "max_tokens": 4, **kwargs}
    choices = _consume(c.completions.create(**args))
    indices = {choice.index for choice in choices}
    assert indices == set(range(kwargs.get("n", 1)))
    assert all(isinstance(choice.text, str) for choice in choices)


@pytest.mark.parametrize("kwargs", CHAT_OK, ids=lambda k: ",".join(k) or "plain")
def test_chat_parameters_are_accepted(client: tuple[openai.OpenAI, str],
                                      kwargs: dict[str, Any]) -> None:
    c, model = client
    args = {"model": model, "messages": MESSAGES, "max_tokens": 4, **kwargs}
    if "max_completion_tokens" in kwargs:
        del args["max_tokens"]
    choices = _consume(c.chat.completions.create(**args))
    assert {choice.index for choice in choices} == set(range(kwargs.get("n", 1)))


@pytest.mark.parametrize(("kwargs", "param"), COMPLETION_BAD, ids=lambda x: str(x))
def test_unsupported_completion_parameters_are_400_naming_them(
        client: tuple[openai.OpenAI, str], kwargs: dict[str, Any], param: str) -> None:
    c, model = client
    with pytest.raises(openai.BadRequestError) as info:
        c.completions.create(**{"model": model, "prompt": PROMPT, "max_tokens": 2, **kwargs})
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == param, body


@pytest.mark.parametrize(("kwargs", "param"), CHAT_BAD, ids=lambda x: str(x))
def test_unsupported_chat_parameters_are_400_naming_them(
        client: tuple[openai.OpenAI, str], kwargs: dict[str, Any], param: str) -> None:
    c, model = client
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(**{"model": model, "messages": MESSAGES, "max_tokens": 2,
                                     **kwargs})
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == param, body
