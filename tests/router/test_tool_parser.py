"""Tool calls parsed out of chat answers, fed in arbitrary pieces (router.tool_parser), and
the grammars of forced calls (router.tools)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from splitserve.router.tool_parser import ForcedParser, HermesParser, ToolCallParser
from splitserve.router.tools import ToolChoice, forced_call_grammar, template_message
from splitserve.v1 import router_pb2

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def _run(parser: ToolCallParser, text: str, piece: int) -> tuple[str, list[tuple[str, str]]]:
    content, calls = [], []
    for i in range(0, len(text), piece):
        c, found = parser.feed(text[i:i + piece])
        content.append(c)
        calls.extend(found)
    c, found = parser.finish()
    content.append(c)
    calls.extend(found)
    return "".join(content), [(call.name, call.arguments) for call in calls]


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 1000])
def test_hermes_calls_in_any_split(piece: int) -> None:
    text = f"Let me check. {CALL} and {CALL.replace('Paris', 'Rome')} done <tool"
    content, calls = _run(HermesParser({"get_weather"}), text, piece)
    assert content == "Let me check.  and  done <tool"
    assert calls == [("get_weather", '{"city": "Paris"}'), ("get_weather", '{"city": "Rome"}')]


def test_hermes_content_is_never_held_longer_than_a_tag_prefix() -> None:
    parser = HermesParser({"f"})
    assert parser.feed("a < b <tool_")[0] == "a < b "
    assert parser.feed("x")[0] == "<tool_x"


@pytest.mark.parametrize("block", [
    "<tool_call>not json</tool_call>",
    '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>',
    '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
    '<tool_call>{"name": ["f"], "arguments": {}}</tool_call>',  # unhashable: no crash
    '<tool_call>{"name": {"a": 1}}</tool_call>',
    '<tool_call>[1, 2]</tool_call>',
])
def test_hermes_keeps_blocks_that_are_not_calls_as_content(block: str) -> None:
    content, calls = _run(HermesParser({"f"}), f"x {block} y", 4)
    assert (content, calls) == (f"x {block} y", [])


def test_hermes_unterminated_call_at_the_end() -> None:
    whole = '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}'
    assert _run(HermesParser({"f"}), whole, 5) == ("", [("f", '{"a": 1}')])
    cut = '<tool_call>{"name": "f", "argu'
    assert _run(HermesParser({"f"}), cut, 5) == (cut, [])


def test_forced_parsers() -> None:
    named = ForcedParser(ToolChoice("named", "f"))
    assert _run(named, '{"a": 1}', 3) == ("", [("f", '{"a": 1}')])
    required = ForcedParser(ToolChoice("required"))
    text = '[{"name": "f", "parameters": {"a": 1}}, {"name": "g", "parameters": {}}]'
    assert _run(required, text, 4) == ("", [("f", '{"a": 1}'), ("g", "{}")])
    assert _run(ForcedParser(ToolChoice("named", "f")), '{"a": ', 3) == ('{"a": ', [])


def test_forced_call_grammars_accept_exactly_the_calls() -> None:
    tools = [router_pb2.Tool(name="f", parameters=json.dumps(
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})),
        router_pb2.Tool(name="g")]
    required = forced_call_grammar(tools, ToolChoice("required", parallel=False))
    assert required is not None
    schema = json.loads(required.spec)
    jsonschema.validate([{"name": "f", "parameters": {"a": 1}}], schema)
    for bad in ([], [{"name": "f", "parameters": {}}], [{"name": "g", "parameters": {}}] * 2,
                [{"name": "h", "parameters": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    named = forced_call_grammar(tools, ToolChoice("named", "g"))
    assert named is not None and json.loads(named.spec) == {"type": "object", "properties": {}}
    assert forced_call_grammar(tools, ToolChoice("auto")) is None


def test_template_messages_carry_calls_as_objects() -> None:
    turn = router_pb2.ChatMessage(role="assistant", tool_calls=[
        router_pb2.ToolCall(id="call_1", name="f", arguments='{"a": 1}')])
    assert template_message(turn) == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]}
    result = router_pb2.ChatMessage(role="tool", content="3", tool_call_id="call_1")
    assert template_message(result) == {"role": "tool", "content": "3", "tool_call_id": "call_1"}


def test_json_nested_past_the_parser_is_text_not_an_error() -> None:
    """Arguments (a client's earlier turn) or a model's call nested deeper than json goes
    (RecursionError, not ValueError): kept as text, never a 500 or a stream cut short."""
    deep = "[" * 5000
    turn = router_pb2.ChatMessage(role="assistant", tool_calls=[
        router_pb2.ToolCall(id="call_1", name="f", arguments=deep)])
    assert template_message(turn)["tool_calls"][0]["function"]["arguments"] == deep
    parser = HermesParser({"f"})
    content, calls = _run(parser, f'<tool_call>{{"name": "f", "arguments": {deep}</tool_call>',
                          1000)
    assert calls == [] and deep in content
    forced = ForcedParser(ToolChoice("named", "f"))
    forced.feed(deep)
    assert forced.finish() == (deep, [])
