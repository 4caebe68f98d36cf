"""Structured output: the grammar a request's tokens must follow (torch-free).

A `StructuredOutput` names a kind and a spec (a JSON Schema, a regex, a list of choices or
a Lark grammar). `grammar()` turns it into the grammar text of llguidance (the constraint
library the engine masks tokens with; see engine/grammar.py), and `validate()` checks that
text once, so a bad schema or regex is a clear ValueError at the router, before any worker
sees the request. Validation results are cached by grammar text: a deployment sees the same
few schemas over and over.
"""

from __future__ import annotations

import enum
import functools
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions  # a TypedDict of the stubs only

# A spec longer than this is refused before it is parsed (a schema of a few hundred
# properties is ~20 KB).
MAX_SPEC_CHARS = 64 * 1024
MAX_CHOICES = 256


class OutputKind(enum.Enum):
    JSON_SCHEMA = "json_schema"
    JSON_OBJECT = "json_object"
    REGEX = "regex"
    CHOICE = "choice"
    GRAMMAR = "grammar"  # Lark, llguidance's dialect


@dataclass(frozen=True)
class StructuredOutput:
    kind: OutputKind
    spec: str = ""  # JSON text for JSON_SCHEMA and CHOICE, empty for JSON_OBJECT

    @classmethod
    def json_schema(cls, schema: object) -> StructuredOutput:
        return cls(OutputKind.JSON_SCHEMA, json.dumps(schema))

    @classmethod
    def choice(cls, choices: list[str]) -> StructuredOutput:
        return cls(OutputKind.CHOICE, json.dumps(choices))

    def grammar(self) -> str:
        """llguidance grammar text (ValueError if the spec is malformed JSON / choices)."""
        return _grammar(self.kind, self.spec)

    def validate(self) -> None:
        """ValueError with the library's message when the grammar does not compile."""
        if len(self.spec) > MAX_SPEC_CHARS:
            raise ValueError(f"structured output spec has {len(self.spec)} characters; at "
                             f"most {MAX_SPEC_CHARS}")
        error = _grammar_error(self.grammar())
        if error:
            raise ValueError(f"invalid {self.kind.value} for structured output: {error}")


@functools.lru_cache(maxsize=256)
def _grammar(kind: OutputKind, spec: str) -> str:
    from llguidance import LLMatcher

    # JSON is written compactly, the way json.dumps writes it (", " and ": ", no other
    # whitespace): free whitespace lets a model pad its output with blank lines until
    # max_tokens. A schema's own "x-guidance" options override these.
    compact: JsonCompileOptions = {"whitespace_flexible": False, "item_separator": ", ",
                                   "key_separator": ": "}
    if kind is OutputKind.JSON_OBJECT:
        return str(LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=compact))
    if kind is OutputKind.JSON_SCHEMA:
        schema = _json(spec, "json_schema")
        if not isinstance(schema, dict):
            raise ValueError("a JSON schema must be a JSON object")
        return str(LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=compact))
    if kind is OutputKind.REGEX:
        if not spec:
            raise ValueError("regex is empty")
        return str(LLMatcher.grammar_from_regex(spec))
    if kind is OutputKind.CHOICE:
        choices = _json(spec, "choice")
        if (not isinstance(choices, list) or not 1 <= len(choices) <= MAX_CHOICES
                or not all(isinstance(c, str) and c for c in choices)):
            raise ValueError(f"choice must be a list of 1 to {MAX_CHOICES} non-empty strings")
        # JSON string literals are Lark string literals in llguidance's dialect.
        return str(LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c) for c in choices)))
    if not spec:
        raise ValueError("grammar is empty")
    return str(LLMatcher.grammar_from_lark(spec))


@functools.lru_cache(maxsize=256)
def _grammar_error(grammar: str) -> str:
    from llguidance import LLMatcher

    message = str(LLMatcher.validate_grammar(grammar))
    return "" if message.startswith("WARNING") else message


def _json(spec: str, what: str) -> object:
    try:
        return json.loads(spec)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting too deep
        raise ValueError(f"{what} is not valid JSON: {exc}") from None
