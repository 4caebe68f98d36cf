"""OpenAI request bodies -> GenerateRequest: exact field mapping, and a 400 naming the
field for everything SplitServe does not honour (pure; no server)."""

from __future__ import annotations

from typing import Any

import pytest

from splitserve.router.openai_schema import OpenAIError, parse_chat, parse_completion
from splitserve.v1 import router_pb2

MODEL = "tiny"


def test_completion_fields_map_onto_generate_request() -> None:
    req = parse_completion({
        "model": MODEL, "prompt": "Hello", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9,
        "stop": "\n", "seed": -1, "stream": True, "stream_options": {"include_usage": True},
        "logprobs": 3, "top_k": 5, "min_p": 0.1, "ignore_eos": True, "user": "ignored",
    }, MODEL)
    expected = router_pb2.GenerateRequest(prompt="Hello")
    sp = expected.sampling_params
    sp.max_tokens, sp.temperature, sp.top_p, sp.seed = 7, 0.5, 0.9, 2**64 - 1
    sp.top_k, sp.min_p, sp.ignore_eos = 5, 0.1, True
    sp.stop.append("\n")
    sp.logprobs, sp.top_logprobs = True, 3
    assert req.generate == expected
    assert (req.chat, req.stream, req.include_usage, req.echo, req.logprobs) == (
        False, True, True, False, 3)


def test_completion_prompt_forms() -> None:
    assert parse_completion({"prompt": [1, 2, 3]}, MODEL).generate.token_ids.token_ids == [1, 2, 3]
    assert parse_completion({"prompt": ["one"]}, MODEL).generate.prompt == "one"
    assert parse_completion({"prompt": [[4, 5]]}, MODEL).generate.token_ids.token_ids == [4, 5]
    unset = parse_completion({"prompt": "x"}, MODEL).generate.sampling_params
    assert not unset.HasField("max_tokens") and not unset.HasField("temperature")


def test_chat_fields_map_onto_generate_request() -> None:
    req = parse_chat({
        "model": MODEL, "max_completion_tokens": 4, "max_tokens": 99, "logprobs": True,
        "top_logprobs": 2, "stop": ["a", "b"], "response_format": {"type": "text"},
        "messages": [{"role": "developer", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                  {"type": "text", "text": "there"}]}],
    }, MODEL)
    messages = [(m.role, m.content) for m in req.generate.messages.messages]
    assert messages == [("system", "Be brief."), ("user", "Hi there")]
    sp = req.generate.sampling_params
    assert (sp.max_tokens, sp.logprobs, sp.top_logprobs, list(sp.stop)) == (4, True, 2, ["a", "b"])
    assert (req.chat, req.logprobs) == (True, 2)
    assert parse_chat({"messages": [{"role": "user", "content": "x"}], "logprobs": True},
                      MODEL).logprobs == 0


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": ["x"] * 33, "n": 2}, "n"),  # 66 choices
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "echo": True, "logprobs": 1}, "echo"),
    ({"prompt": "x", "temperature": -0.1}, "temperature"),
    ({"prompt": "x", "temperature": 2.5}, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
    ({"prompt": "x", "frequency_penalty": "much"}, "frequency_penalty"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "x", "repetition_penalty": 2.5}, "repetition_penalty"),
    ({"prompt": "x", "logit_bias": {"one": 5}}, "logit_bias"),
    # Unicode digits that int() refuses (a fuzzed 500): not token ids.
    ({"prompt": "x", "logit_bias": {"\u00b9": 1}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"\u0663": 1}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"1": 500}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"1": True}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": [1, 2]}, "logit_bias"),
    ({"prompt": "x", "suffix": "end"}, "suffix"),
    ({"prompt": "x", "stop": ["ok", ""]}, "stop"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": ["a", [1, -2]]}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1, -2]}, "prompt"),
    ({"prompt": ""}, None),  # empty prompt: left to the router's validation
    ({}, "prompt"),
])
def test_completion_rejections(body: dict[str, Any], param: str | None) -> None:
    if param is None:
        assert parse_completion(body, MODEL).generate.prompt == ""
        return
    with pytest.raises(OpenAIError) as info:
        parse_completion(body, MODEL)
    error = info.value.body()["error"]
    assert (info.value.status, error["type"], error["param"]) == (400, "invalid_request_error",
                                                                 param)


USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": USER, "tools": [{"type": "function"}]}, "tools[0]"),
    ({"messages": USER, "tool_choice": "auto"}, "tool_choice"),
    ({"messages": USER, "response_format": {"type": "json_schema",
                                            "json_schema": {"schema": "x"}}}, "response_format"),
    ({"messages": USER, "structured_outputs": {"choice": []}}, "structured_outputs"),
    ({"messages": USER, "guided_json": {"type": 7}}, "guided_json"),
    ({"messages": USER, "guided_json": "[" * 5000}, "guided_json"),  # nesting: not a 500
    # Lone surrogates cannot go into a protobuf string: a 400 naming the field, not a 500.
    ({"messages": USER, "tools": [{"type": "function", "function": {"name": "\ud800"}}]},
     "tools[0]"),
    ({"messages": USER, "tools": [{"type": "function", "function": {
        "name": "f", "description": "\udfff"}}]}, "tools[0]"),
    ({"messages": [*USER, {"role": "assistant", "tool_calls": [{"id": "c", "function": {
        "name": "f", "arguments": "\ud800"}}]}]}, "messages[1].tool_calls[0]"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "\ud800"}]},
     "messages[0].tool_call_id"),
    ({"messages": USER, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "string"}}}], "tool_choice": "required"}, "tools[0]"),
    ({"messages": USER, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": USER, "n": 65}, "n"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
     "messages[0].tool_calls"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ({"messages": [{"content": "no role"}]}, "messages[0]"),
])
def test_chat_rejections(body: dict[str, Any], param: str) -> None:
    with pytest.raises(OpenAIError) as info:
        parse_chat(body, MODEL)
    assert (info.value.status, info.value.param) == (400, param)


def test_body_must_be_an_object() -> None:
    with pytest.raises(OpenAIError) as info:
        parse_chat([1, 2], MODEL)
    assert info.value.status == 400
    with pytest.raises(OpenAIError) as info:
        parse_completion({"prompt": "x", "model": "other"}, MODEL)
    assert (info.value.code, info.value.status) == ("model_not_found", 404)


def test_penalties_and_logit_bias_reach_the_sampling_params() -> None:
    sp = parse_completion({"prompt": "x", "presence_penalty": 0.5, "frequency_penalty": -1,
                           "repetition_penalty": 1.2, "logit_bias": {"7": -100, "12": 2.5}},
                          MODEL).generate.sampling_params
    assert (sp.presence_penalty, sp.frequency_penalty) == (0.5, -1.0)
    assert sp.HasField("repetition_penalty") and abs(sp.repetition_penalty - 1.2) < 1e-6
    assert dict(sp.logit_bias) == {7: -100.0, 12: 2.5}
    plain = parse_completion({"prompt": "x"}, MODEL).generate.sampling_params
    assert not plain.HasField("repetition_penalty") and not plain.logit_bias


def test_n_and_prompt_batches_fan_out_into_choices() -> None:
    req = parse_completion({"prompt": ["a", [1, 2]], "n": 2, "seed": 2**64 - 1}, MODEL)
    choices = req.choice_requests()
    assert [c.WhichOneof("input") for c in choices] == ["prompt", "prompt", "token_ids",
                                                        "token_ids"]
    assert [c.sampling_params.seed for c in choices] == [2**64 - 1, 0, 2**64 - 1, 0]
    single = parse_completion({"prompt": ["only"]}, MODEL)
    assert single.prompts == [] and len(single.choice_requests()) == 1
    assert parse_chat({"messages": [{"role": "user", "content": "x"}], "n": 4},
                      MODEL).n == 4


def test_later_samples_wait_for_the_first_samples_first_chunk() -> None:
    import asyncio

    from splitserve.router.http_api import _FirstSamples

    async def body() -> list[str]:
        first = _FirstSamples(num_choices=4, n=2)  # prompts 0 and 1, two samples each
        order: list[str] = []

        async def sample(index: int) -> None:
            await first.wait_turn(index)
            order.append(f"start {index}")

        tasks = [asyncio.create_task(sample(i)) for i in (3, 1, 2, 0)]
        await asyncio.sleep(0.01)
        assert sorted(order) == ["start 0", "start 2"]  # the firsts go at once
        first.went(1)  # a later sample's chunk opens nothing
        await asyncio.sleep(0.01)
        assert len(order) == 2
        first.went(2)
        await asyncio.sleep(0.01)
        assert "start 3" in order and "start 1" not in order
        first.went(0)
        await asyncio.gather(*tasks)
        return order

    assert len(asyncio.run(body())) == 4


def test_priority_is_the_scheduling_class_of_every_choice() -> None:
    completion = parse_completion({"prompt": ["a", "b"], "priority": -3, "n": 2}, "m")
    assert [r.priority for r in completion.choice_requests()] == [-3] * 4
    assert parse_chat({"messages": [{"role": "user", "content": "hi"}], "priority": 7},
                      "m").generate.priority == 7
    assert parse_completion({"prompt": "a"}, "m").generate.priority == 0
    for bad in (2**31, -(2**31) - 1, 1.5, "high", True):
        with pytest.raises(OpenAIError) as info:
            parse_completion({"prompt": "a", "priority": bad}, "m")
        assert info.value.param == "priority"


def test_stream_pace_takes_a_rate_or_a_named_speed_on_streams_only() -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    assert parse_chat({**chat, "stream_pace": 20}, "m").generate.stream_pace_tokens_per_s == 20
    assert parse_chat({**chat, "stream_pace": "reading"},
                      "m").generate.stream_pace_tokens_per_s == 5.0
    assert parse_completion({"prompt": ["a", "b"], "stream": True, "stream_pace": 7.5},
                            "m").choice_requests()[1].stream_pace_tokens_per_s == 7.5
    assert parse_chat(chat, "m").generate.stream_pace_tokens_per_s == 0.0
    assert parse_completion({"prompt": "a", "stream_pace": 0}, "m").generate \
        .stream_pace_tokens_per_s == 0.0  # not paced: no stream needed
    for bad in (-1, 1e9, "sprint", True, [20], {"rate": 20}, 10**400):  # (too big a float)
        with pytest.raises(OpenAIError, match="stream_pace") as info:
            parse_chat({**chat, "stream_pace": bad}, "m")
        assert info.value.param == "stream_pace" and info.value.status == 400
    with pytest.raises(OpenAIError, match="stream=true") as info:
        parse_chat({**chat, "stream": False, "stream_pace": 20}, "m")
    assert info.value.param == "stream_pace"
