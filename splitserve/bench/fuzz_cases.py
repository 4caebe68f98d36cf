"""Fuzz cases for the router's public APIs, as hypothesis strategies: one definition for
tests/http/test_hardening.py and `splitserve bench fuzz`.

- `BODIES` / `MESSAGE`: JSON bodies of OpenAI completion and chat requests, every field
  drawn from JSON values of any type (most are bad);
- `http_cases()`: whole HTTP requests, a strategy per kind: those bodies on the two generate
  paths, non-JSON bodies there, and odd methods, paths and content types anywhere;
- `generate_requests()`: GenerateRequest messages with any field values the wire allows;
- `grpc_cases()`: serialized messages for a raw Generate call, a strategy per kind:
  generated requests, random bytes, and generated requests cut short.

`run_examples` draws examples outside pytest (inside `storage_in`, so that what hypothesis
writes even without an example database stays out of ./.hypothesis). Needs hypothesis (the
dev extras).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import HealthCheck, Phase, configuration, given, settings
from hypothesis import seed as fixed_seed
from hypothesis import strategies as st

from splitserve.v1 import common_pb2, router_pb2

T = TypeVar("T")

UINT32_MAX = 2**32 - 1
GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions")

# ---- OpenAI API bodies -------------------------------------------------------------------

_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                     st.floats(allow_nan=False, allow_subnormal=False), st.text(max_size=20))
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
_FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
           "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "stream",
           "stream_options", "logprobs", "top_logprobs", "echo", "n", "best_of",
           "presence_penalty", "frequency_penalty", "logit_bias", "response_format", "tools",
           "ignore_eos", "skip_special_tokens", "user", "suffix", "tool_choice",
           "parallel_tool_calls", "guided_json", "guided_regex", "guided_choice",
           "guided_grammar", "structured_outputs"]
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant",
                                                          "developer", "tool", "x", ""]),
                                 "content": st.one_of(st.text(max_size=30), _VALUES)})
BODIES = st.dictionaries(st.sampled_from(_FIELDS), _VALUES, max_size=8).map(
    lambda body: {**body, "max_tokens": 2} if "max_tokens" not in body else body)


def api_body(body: dict[str, Any], messages: list[Any], path: str, *, stream: bool = True,
             max_tokens_cap: int | None = None) -> dict[str, Any]:
    """A drawn body made ready for `path`: a chat body without messages gets `messages`;
    stream=False turns `"stream": true` off; max_tokens_cap lowers token limits the wire
    accepts (1 .. UINT32_MAX) to the cap, so accepted requests stay short."""
    body = dict(body)
    if path.endswith("chat/completions") and "messages" not in body:
        body["messages"] = messages
    if not stream and body.get("stream") is True:
        body["stream"] = False
    if max_tokens_cap is not None:
        for key in ("max_tokens", "max_completion_tokens"):
            value = body.get(key)
            if type(value) is int and max_tokens_cap < value <= UINT32_MAX:
                body[key] = max_tokens_cap
    return body


# ---- whole HTTP requests -----------------------------------------------------------------


@dataclass(frozen=True)
class HttpCase:
    """One HTTP request. kind: "api" (a drawn JSON body on a generate path), "garbage" (a
    body that is not one, on a generate path) or "route" (any method on any path)."""

    kind: str
    method: str
    path: str
    body: bytes | None
    content_type: str | None


_PATHS = (*GENERATE_PATHS, "/", "/health", "/metrics", "/v1", "/v1/models",
          "/v1/models/x", "/v1/embeddings", "/v1/completions/", "/v1//completions",
          "/v1/chat/completions/x", "/../../etc/passwd", "/v1/completions?x=1")
_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD")
_URL_SAFE = st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="#?")
_CONTENT_TYPES = st.sampled_from([None, "application/json", "text/plain",
                                  "multipart/form-data", "application/json; charset=latin-1"])
_NOT_JSON = st.one_of(
    st.binary(max_size=256),
    st.text(max_size=64).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"", b"null", b"[]", b"42", b'"text"', b"{", b'{"prompt": }',
                     b"\xef\xbb\xbf{}", b'{"prompt": "\xff\xfe"}', b"[" * 5000]),
    _VALUES.map(lambda v: json.dumps(v).encode()),
)


@st.composite
def _api_case(draw: st.DrawFn, max_tokens_cap: int | None) -> HttpCase:
    path = draw(st.sampled_from(GENERATE_PATHS))
    body = api_body(draw(BODIES), draw(st.lists(MESSAGE, max_size=3)), path,
                    max_tokens_cap=max_tokens_cap)
    return HttpCase("api", "POST", path, json.dumps(body).encode(), "application/json")


@st.composite
def _garbage_case(draw: st.DrawFn) -> HttpCase:
    return HttpCase("garbage", "POST", draw(st.sampled_from(GENERATE_PATHS)),
                    draw(_NOT_JSON), draw(_CONTENT_TYPES))


@st.composite
def _route_case(draw: st.DrawFn) -> HttpCase:
    method = draw(st.sampled_from(_METHODS) | st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ-_",
                                                      min_size=1, max_size=12))
    path = draw(st.sampled_from(_PATHS) | st.text(_URL_SAFE, max_size=40).map(lambda s: "/" + s))
    body = draw(st.none() | _NOT_JSON)
    return HttpCase("route", method, path, body, draw(_CONTENT_TYPES))


def http_cases(max_tokens_cap: int | None = 4) -> dict[str, st.SearchStrategy[HttpCase]]:
    """A strategy per HttpCase kind (draw each kind's share of a run from its own: hypothesis
    would not split a one_of evenly)."""
    return {"api": _api_case(max_tokens_cap), "garbage": _garbage_case(),
            "route": _route_case()}


# ---- gRPC --------------------------------------------------------------------------------

_PROTO_TEXT = st.text(max_size=40)
_U32 = st.integers(0, UINT32_MAX)
_FLOAT32 = st.floats(width=32, allow_nan=True, allow_subnormal=False)
_SAMPLING = st.builds(
    common_pb2.SamplingParams,
    max_tokens=st.integers(0, UINT32_MAX) | st.just(2), temperature=_FLOAT32, top_p=_FLOAT32,
    top_k=_U32, min_p=_FLOAT32, seed=st.integers(0, 2**64 - 1),
    stop=st.lists(_PROTO_TEXT, max_size=3),
    stop_token_ids=st.lists(_U32, max_size=3), ignore_eos=st.booleans(),
    presence_penalty=_FLOAT32, frequency_penalty=_FLOAT32, repetition_penalty=_FLOAT32,
    logit_bias=st.dictionaries(_U32, _FLOAT32, max_size=3),
    logprobs=st.booleans(), top_logprobs=st.integers(0, 40))
_MESSAGES = st.lists(st.builds(router_pb2.ChatMessage, role=_PROTO_TEXT | st.sampled_from(
    ["user", "system", "assistant"]), content=_PROTO_TEXT), max_size=3)


@st.composite
def generate_requests(draw: st.DrawFn) -> router_pb2.GenerateRequest:
    request = router_pb2.GenerateRequest(
        request_id=draw(_PROTO_TEXT), model=draw(st.sampled_from(["", "other"])),
        sampling_params=draw(_SAMPLING))
    kind = draw(st.sampled_from(["prompt", "messages", "token_ids", "none"]))
    if kind == "prompt":
        request.prompt = draw(_PROTO_TEXT)
    elif kind == "messages":
        request.messages.messages.extend(draw(_MESSAGES))
    elif kind == "token_ids":
        request.token_ids.token_ids.extend(draw(st.lists(_U32, max_size=8)))
    return request


def cap_max_tokens(request: router_pb2.GenerateRequest, cap: int) -> router_pb2.GenerateRequest:
    """Keep accepted requests short: max_tokens above `cap` becomes `cap` (in place)."""
    if request.sampling_params.max_tokens > cap:
        request.sampling_params.max_tokens = cap
    return request


@dataclass(frozen=True)
class GrpcCase:
    """One serialized Generate message. kind: "request" (a generated GenerateRequest),
    "bytes" (random bytes) or "truncated" (a generated request cut short)."""

    kind: str
    data: bytes


@st.composite
def _truncated_case(draw: st.DrawFn, max_tokens_cap: int) -> GrpcCase:
    data = cap_max_tokens(draw(generate_requests()), max_tokens_cap).SerializeToString()
    return GrpcCase("truncated", data[:draw(st.integers(0, max(0, len(data) - 1)))])


def grpc_cases(max_tokens_cap: int = 4) -> dict[str, st.SearchStrategy[GrpcCase]]:
    """A strategy per GrpcCase kind."""
    return {
        "request": generate_requests().map(
            lambda r: GrpcCase("request", cap_max_tokens(r, max_tokens_cap).SerializeToString())),
        "bytes": st.binary(max_size=64).map(lambda b: GrpcCase("bytes", b)),
        "truncated": _truncated_case(max_tokens_cap),
    }


# ---- drawing outside pytest --------------------------------------------------------------


def run_examples(strategy: st.SearchStrategy[T], max_examples: int,
                 handle: Callable[[T], None], seed: int | None = None) -> None:
    """Call `handle` on up to `max_examples` examples of `strategy` (fewer when hypothesis
    runs out of distinct ones: count the calls). Generation only: no example database, no
    shrinking, no deadline; random unless `seed` is given. `handle` must not raise."""

    @settings(max_examples=max_examples, database=None, deadline=None, derandomize=False,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(strategy)
    def draw(example: T) -> None:
        handle(example)

    (draw if seed is None else fixed_seed(seed)(draw))()


@contextmanager
def storage_in(folder: Path) -> Iterator[None]:
    """Hypothesis's own files in `folder` while the block runs (then where they were)."""
    previous = configuration.storage_directory(intent_to_write=False).home_directory
    configuration.set_hypothesis_home_dir(folder)
    try:
        yield
    finally:
        configuration.set_hypothesis_home_dir(previous)
