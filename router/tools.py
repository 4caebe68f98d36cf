"""Tools (function calling): what the chat template sees, and the grammar of a forced call.

The chat template renders `tools` and the conversation's tool calls and results the way
transformers passes them (tools as OpenAI's [{"type": "function", "function": {...}}],
an assistant turn's `tool_calls` with the arguments as a parsed object, a tool turn's
`tool_call_id`). How the model answers depends on `tool_choice`:
- "auto": free text; the router finds calls in it (router.tool_parser, Hermes' format:
  <tool_call>{"name": ..., "arguments": {...}}</tool_call>, which tool-trained chat
  templates of Qwen 2.5, Hermes and SmolLM3 teach);
- "required": the output is constrained to a JSON array of calls, [{"name", "parameters"}]
  (one call when parallel_tool_calls is false);
- a named function: the output is constrained to that function's arguments object;
- "none": free text, never parsed.
The two forced forms are template-independent: they do not rely on the model knowing a
call syntax, as vLLM does it. Pure (no I/O); torch-free.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from splitserve.common.structured_output import StructuredOutput
from splitserve.v1 import router_pb2

NO_TOOLS_TEMPLATE = ("this model's chat template does not render tools (serve it with a "
                     "--chat-template that does, e.g. deploy/chat-templates/chatml-tools.jinja)")
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_TOOLS = 128


@dataclass(frozen=True)
class ToolChoice:
    """How the answer may use the tools: mode "none" | "auto" | "required" | "named"."""

    mode: str
    name: str = ""  # the function, for "named"
    parallel: bool = True  # "required": more than one call allowed


class ToolError(ValueError):
    """A tool definition breaks a rule; `param` names the field ("tools" or "tools[i]")."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def check_tools(defined: Sequence[router_pb2.Tool]) -> None:
    """The rules every request's tools obey, whichever API they came through: at most
    MAX_TOOLS, names matching TOOL_NAME and unique, parameters a JSON schema of an object."""
    if len(defined) > MAX_TOOLS:
        raise ToolError(f"at most {MAX_TOOLS} tools, got {len(defined)}", "tools")
    names: set[str] = set()
    for i, tool in enumerate(defined):
        where = f"tools[{i}]"
        if not TOOL_NAME.match(tool.name):
            raise ToolError(f"{where}.name {tool.name!r} must match {TOOL_NAME.pattern}", where)
        if tool.name in names:
            raise ToolError(f"tools: the function name {tool.name!r} is defined twice",
                            "tools")
        names.add(tool.name)
        if tool.parameters:
            try:
                schema = json.loads(tool.parameters)
            except (ValueError, RecursionError):
                raise ToolError(f"{where}.parameters is not valid JSON", where) from None
            if not isinstance(schema, dict) or schema.get("type", "object") != "object":
                raise ToolError(f"{where}.parameters must be a JSON schema of an object (the "
                                "arguments)", where)


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def parameters_schema(tool: router_pb2.Tool) -> dict[str, Any]:
    """The arguments' JSON schema (an empty object schema when the tool has none)."""
    if not tool.parameters:
        return {"type": "object", "properties": {}}
    schema = json.loads(tool.parameters)
    return schema if isinstance(schema, dict) else {"type": "object"}


def template_tools(tools: list[router_pb2.Tool]) -> list[dict[str, Any]]:
    """`tools` as chat templates expect them."""
    out = []
    for tool in tools:
        function: dict[str, Any] = {"name": tool.name, "parameters": parameters_schema(tool)}
        if tool.description:
            function["description"] = tool.description
        out.append({"type": "function", "function": function})
    return out


def template_message(message: router_pb2.ChatMessage) -> dict[str, Any]:
    """One turn as chat templates expect it."""
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": call.id, "type": "function",
             "function": {"name": call.name, "arguments": _arguments(call.arguments)}}
            for call in message.tool_calls
        ]
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    if message.name:
        out["name"] = message.name
    return out


def _arguments(text: str) -> Any:
    """Arguments as an object (what templates render with tojson); text that is not JSON
    stays text."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # (nested deeper than the parser goes: text too)
        return text


def template_supports_tools(template: str | None) -> bool:
    """Whether a chat template renders the `tools` variable at all."""
    return template is not None and re.search(r"\btools\b", template) is not None


def forced_call_grammar(tools: list[router_pb2.Tool], choice: ToolChoice
                        ) -> StructuredOutput | None:
    """The grammar of a "required" or named answer (None for "auto" and "none")."""
    if choice.mode == "named":
        tool = next(t for t in tools if t.name == choice.name)
        return StructuredOutput.json_schema(parameters_schema(tool))
    if choice.mode != "required":
        return None
    calls = [{"type": "object",
              "properties": {"name": {"const": t.name}, "parameters": parameters_schema(t)},
              "required": ["name", "parameters"], "additionalProperties": False}
             for t in tools]
    array: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
    if not choice.parallel:
        array["maxItems"] = 1
    return StructuredOutput.json_schema(array)
