"""Tool calls found in a chat answer, as it streams (router.tools explains the modes).

`HermesParser` ("auto"): content is passed through as it arrives, except text that may be
the start of a `<tool_call>` tag, which is held back until it is known; each complete
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` becomes a call. A block that
is not a valid call stays content (nothing the model wrote is dropped); an unterminated
block at the end is a call when its JSON is whole (models often end on EOS right after it).

`ForcedParser` ("required" / a named function): the whole answer is the call(s) in JSON,
which the grammar guarantees unless max_tokens cut it short; then it is returned as content.
Both cost O(new text) per delta.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from splitserve.engine.stop_checker import held_back_length
from splitserve.router.tools import ToolChoice, new_call_id

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"


@dataclass(frozen=True)
class ParsedCall:
    id: str
    name: str
    arguments: str  # JSON text of an object

    def json(self, index: int | None = None) -> dict[str, Any]:
        """OpenAI's tool_calls[] item (with `index` in stream deltas)."""
        out: dict[str, Any] = {"id": self.id, "type": "function",
                               "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


class ToolCallParser:
    def feed(self, text: str) -> tuple[str, list[ParsedCall]]:
        """Content to emit now and the calls completed by `text`."""
        raise NotImplementedError

    def finish(self) -> tuple[str, list[ParsedCall]]:
        """What remains at the end of the answer."""
        raise NotImplementedError

    def take(self, text: str, final: bool) -> tuple[str, list[ParsedCall]]:
        """feed(text), then finish() when `text` is the last of the answer."""
        content, calls = self.feed(text)
        if final:
            rest, more = self.finish()
            content, calls = content + rest, calls + more
        return content, calls


def parser_for(choice: ToolChoice | None, tool_names: list[str]) -> ToolCallParser | None:
    """The parser of an answer under `choice` (None: plain content)."""
    if choice is None or choice.mode == "none":
        return None
    if choice.mode == "auto":
        return HermesParser(set(tool_names))
    return ForcedParser(choice)


class HermesParser(ToolCallParser):
    def __init__(self, tool_names: set[str]) -> None:
        self._names = tool_names
        self._buffer = ""
        self._inside = False

    def feed(self, text: str) -> tuple[str, list[ParsedCall]]:
        self._buffer += text
        content: list[str] = []
        calls: list[ParsedCall] = []
        while True:
            if not self._inside:
                start = self._buffer.find(OPEN_TAG)
                if start < 0:
                    keep = held_back_length(self._buffer, (OPEN_TAG,))
                    content.append(self._buffer[:len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep:]
                    break
                content.append(self._buffer[:start])
                self._buffer = self._buffer[start:]
                self._inside = True
            end = self._buffer.find(CLOSE_TAG)
            if end < 0:
                break
            block = self._buffer[:end + len(CLOSE_TAG)]
            self._buffer = self._buffer[end + len(CLOSE_TAG):]
            self._inside = False
            call = self._call(block[len(OPEN_TAG):end])
            if call is None:
                content.append(block)
            else:
                calls.append(call)
        return "".join(content), calls

    def finish(self) -> tuple[str, list[ParsedCall]]:
        rest, self._buffer = self._buffer, ""
        if self._inside:
            self._inside = False
            call = self._call(rest[len(OPEN_TAG):])
            if call is not None:
                return "", [call]
        return rest, []

    def _call(self, body: str) -> ParsedCall | None:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):  # (model output nested past the parser)
            return None
        name = data.get("name") if isinstance(data, dict) else None
        if not isinstance(name, str) or name not in self._names:
            return None
        arguments = data.get("arguments", data.get("parameters", {}))
        if isinstance(arguments, str):  # some models write the arguments as JSON text
            try:
                arguments = json.loads(arguments)
            except (ValueError, RecursionError):
                return None
        if not isinstance(arguments, dict):
            return None
        return ParsedCall(new_call_id(), name, json.dumps(arguments, ensure_ascii=False))


class ForcedParser(ToolCallParser):
    def __init__(self, choice: ToolChoice) -> None:
        self._choice = choice
        self._buffer: list[str] = []

    def feed(self, text: str) -> tuple[str, list[ParsedCall]]:
        self._buffer.append(text)
        return "", []

    def finish(self) -> tuple[str, list[ParsedCall]]:
        text = "".join(self._buffer)
        self._buffer = []
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            return text, []  # cut short by max_tokens: what there is, as content
        if self._choice.mode == "named" and isinstance(data, dict):
            return "", [ParsedCall(new_call_id(), self._choice.name,
                                   json.dumps(data, ensure_ascii=False))]
        if self._choice.mode == "required" and isinstance(data, list) and all(
                isinstance(c, dict) and isinstance(c.get("name"), str) for c in data):
            return "", [ParsedCall(new_call_id(), c["name"],
                                   json.dumps(c.get("parameters", {}), ensure_ascii=False))
                        for c in data]
        return text, []
