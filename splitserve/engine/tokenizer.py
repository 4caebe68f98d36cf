"""Tokenizer and incremental detokenizer over a model directory's tokenizer.json.

Torch-free and transformers-free (the router imports this): the fast tokenizer comes
from the ``tokenizers`` library, special tokens from tokenizer_config.json, the chat
template (chat_template.jinja or tokenizer_config.json) is rendered with jinja2 the
way transformers renders it, and extra stop ids come from generation_config.json.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    """Text <-> token ids for one model. Build it with ``Tokenizer.from_dir``."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        special_tokens: dict[str, str],
        chat_template: str | None = None,
        extra_eos_token_ids: Iterable[int] = (),
    ) -> None:
        self.backend = backend
        self.special_tokens = dict(special_tokens)  # e.g. {"eos_token": "<|im_end|>"}
        self.chat_template = chat_template
        self.bos_token_id = self._token_id("bos_token")
        self.eos_token_id = self._token_id("eos_token")
        self.pad_token_id = self._token_id("pad_token")
        eos = set(extra_eos_token_ids)
        if self.eos_token_id is not None:
            eos.add(self.eos_token_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        # len(tokenizer) in transformers: base vocab plus added tokens.
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self._template: jinja2.Template | None = None

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ValueError(f"{str(path)!r}: no tokenizer.json (a fast tokenizer is required)")
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        config = _read_json(path / "tokenizer_config.json")
        special = {**_read_json(path / "special_tokens_map.json"), **config}
        special_tokens = {
            key: _token_content(special[key]) for key in _SPECIAL_TOKEN_KEYS if special.get(key)
        }
        template_file = path / "chat_template.jinja"
        template = template_file.read_text() if template_file.is_file() else None
        if template is None:
            template = _default_template(config.get("chat_template"))
        generation = _read_json(path / "generation_config.json")
        extra_eos = generation.get("eos_token_id")
        if extra_eos is None:
            extra_eos = []
        elif isinstance(extra_eos, int):
            extra_eos = [extra_eos]
        return cls(backend, special_tokens, template, extra_eos)

    def _token_id(self, key: str) -> int | None:
        content = self.special_tokens.get(key)
        return None if content is None else self.backend.token_to_id(content)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # No "clean up tokenization spaces" pass: it is not prefix-stable, so streamed
        # text could not match the full decode.
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template_text(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The rendered prompt; ``kwargs`` (e.g. ``tools``) go to the template."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        if self._template is None:
            self._template = _jinja_env().from_string(self.chat_template)
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens,
            **kwargs,
        )

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """Token ids of the rendered prompt (special tokens come from the template text)."""
        text = self.apply_chat_template_text(messages, add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text deltas.

    Keeps two offsets into ``ids`` (prompt + output so far), as vLLM does: the text of
    ``ids[prefix_offset:read_offset]`` has already been emitted, and each step decodes
    only ``ids[prefix_offset:]`` and emits what it adds. The prefix window gives the new
    tokens their left context (leading spaces, byte merges). Text whose decode ends in
    U+FFFD (an incomplete UTF-8 character) is held back until a later token completes it
    or ``flush()`` is called; ``read_offset`` only ever lands where the decode ends
    cleanly, so the concatenated deltas equal ``decode(output ids)``.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        context_tokens: int = 5,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_token_ids[-context_tokens:]) if context_tokens else []
        self._num_context = len(self._ids)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        if self._decode(0, self._read_offset).endswith(_REPLACEMENT_CHAR):
            # The prompt ends inside a character: its bytes cannot prefix ours cleanly.
            self._ids, self._num_context, self._read_offset = [], 0, 0
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._pieces)

    @property
    def output_token_ids(self) -> list[int]:
        return self._ids[self._num_context:]

    def add(self, token_ids: Iterable[int]) -> str:
        """Append output tokens; return the newly completed text (possibly "")."""
        self._ids.extend(token_ids)
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self._ids))
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        return self._emit(new_text[len(prefix_text):])

    def flush(self) -> str:
        """Emit any held-back text (incomplete characters come out as U+FFFD)."""
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self._ids))
        return self._emit(new_text[len(prefix_text):])

    def _emit(self, delta: str) -> str:
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        if delta:
            self._pieces.append(delta)
        return delta

    def _decode(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self.tokenizer.decode(self._ids[start:end], self.skip_special_tokens)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_content(token: str | dict[str, Any]) -> str:
    return token["content"] if isinstance(token, dict) else token


def _default_template(template: str | list[dict[str, str]] | None) -> str | None:
    """tokenizer_config.json may hold one template or a list of named ones."""
    if isinstance(template, list):
        named = {entry["name"]: entry["template"] for entry in template}
        return named.get("default")
    return template


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _jinja_env() -> ImmutableSandboxedEnvironment:
    # Same whitespace handling and helpers that HF chat templates are written against.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env
