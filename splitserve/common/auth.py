"""Client API keys: who may call the router's APIs, and under which name.

Keys come from a file (`--api-keys-file`) and/or the env var SPLITSERVE_API_KEYS. Both use
one format: entries `name:key`, one per line in the file (blank lines and `#` comments
skipped) or comma-separated in the variable. The name is the client's identity (logs,
metrics, fairness); the key is the secret a client sends as `Authorization: Bearer <key>`
(HTTP) or the gRPC metadata `authorization: Bearer <key>`.

Keys are held only as SHA-256 digests, and a presented token is looked up by its digest,
so the time a lookup takes does not depend on how much of a key was guessed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MIN_KEY_CHARS = 16
ANONYMOUS = "anonymous"  # the client of every request when no API keys are configured


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class ApiKeys:
    """A set of named API keys."""

    def __init__(self, entries: Iterable[tuple[str, str]], *, what: str = "") -> None:
        """`what` names the keys in errors (default: "the API key of <name>")."""
        self._names: dict[bytes, str] = {}
        for name, key in entries:
            if not _NAME.match(name):
                raise ValueError(f"API key name {name!r}: use 1-64 letters, digits or _.@-")
            if len(key) < MIN_KEY_CHARS or any(c.isspace() for c in key):
                raise ValueError(f"{what or f'the API key of {name!r}'} must have at least "
                                 f"{MIN_KEY_CHARS} characters and no whitespace")
            digest = _digest(key)
            if digest in self._names:
                raise ValueError(f"API key of {name!r} is also {self._names[digest]!r}'s")
            self._names[digest] = name
        if not self._names:
            raise ValueError("no API keys given")

    @classmethod
    def single(cls, name: str, key: str | None, what: str = "") -> ApiKeys | None:
        """One named key, or None when `key` is empty (no authentication)."""
        return cls([(name, key)], what=what) if key else None

    @classmethod
    def parse(cls, text: str, *, separator: str = "\n") -> ApiKeys:
        return cls(_entries(text, separator))

    @classmethod
    def load(cls, path: str | None, env_value: str | None) -> ApiKeys | None:
        """The keys of the file at `path` and of `env_value` together; None if neither."""
        entries: list[tuple[str, str]] = []
        if path:
            found = _entries(Path(path).read_text(), "\n")
            if not found:  # an empty file must not silently leave the API open
                raise ValueError(f"API keys file {path}: no name:key entries")
            entries += found
        if env_value and env_value.strip():
            found = _entries(env_value, ",")
            if not found:
                raise ValueError("SPLITSERVE_API_KEYS: no name:key entries")
            entries += found
        return cls(entries) if entries else None

    def identify(self, token: str) -> str | None:
        """The name of the client whose key `token` is, or None."""
        return self._names.get(_digest(token))

    def __len__(self) -> int:
        return len(self._names)


def _entries(text: str, separator: str) -> list[tuple[str, str]]:
    entries = []
    for number, raw in enumerate(text.split(separator), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, key = line.partition(":")
        if not colon:
            raise ValueError(f"API keys entry {number}: expected name:key")
        entries.append((name.strip(), key.strip()))
    return entries


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value, or None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def client_name(keys: ApiKeys | None, authorization: str | None) -> str:
    """The client a request with this `Authorization` value belongs to: the name of its
    key, or ANONYMOUS (no keys configured, or, for callers that did not check, no match)."""
    token = bearer_token(authorization)
    name = keys.identify(token) if keys is not None and token is not None else None
    return name or ANONYMOUS
