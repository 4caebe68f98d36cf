"""The rules every request field obeys, in one module: the router checks them on gRPC and HTTP
requests before any work, and the workers check the same rules on what the router sends
(SamplingParams.validate calls in here). Torch-free.

Sizes are bounded so that no single request can make the router do unbounded work (parse,
tokenize, echo) before it is refused; numbers are bounded to what the wire (protobuf
uint32 / uint64 / float32) and the sampler can hold.
"""

from __future__ import annotations

import math

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
# Below this, a temperature is greedy sampling (dividing logits by it would overflow).
GREEDY_TEMPERATURE_EPS = 1e-5
# A positive top_p below this is raised to it: smaller values round to float32 denormals on
# the wire, which a process with denormals-are-zero set (torch's CPU math does) reads as 0.
# Any top_p this small keeps only the most likely token.
MIN_TOP_P = 1e-6
MAX_TEMPERATURE = 100.0
MAX_REQUEST_ID_CHARS = 256
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 4096
MAX_MODEL_NAME_CHARS = 1024
# A prompt longer than this many characters per context token cannot fit the context under
# any tokenizer we serve: refuse it before tokenizing (which costs seconds for megabytes).
MAX_CHARS_PER_TOKEN = 64
CHAT_ROLES = ("system", "user", "assistant", "tool")
# JSON nesting deeper than this is refused (OpenAI bodies need about 5 levels).
MAX_JSON_DEPTH = 32


def check_text(name: str, value: str) -> None:
    """ValueError unless `value` encodes as UTF-8 (a lone surrogate such as \\ud800 does not)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{name} is not valid Unicode text ({exc.reason} at index "
                         f"{exc.start})") from None


def check_request_id(value: str) -> None:
    if len(value) > MAX_REQUEST_ID_CHARS:
        raise ValueError(f"request_id has {len(value)} characters; at most "
                         f"{MAX_REQUEST_ID_CHARS} are allowed")
    check_text("request_id", value)
    if not value.isprintable():
        raise ValueError("request_id must be printable text")


def check_role(name: str, role: str) -> None:
    if role not in CHAT_ROLES:
        raise ValueError(f"{name} {role!r} is not a chat role; expected one of "
                         f"{list(CHAT_ROLES)}")


def check_prompt_chars(num_chars: int, max_model_len: int) -> None:
    limit = max_model_len * MAX_CHARS_PER_TOKEN
    if num_chars > limit:
        raise ValueError(f"the prompt has {num_chars} characters, more than any prompt that "
                         f"fits the model context of {max_model_len} tokens "
                         f"({limit} characters at most)")


def check_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")


def json_depth_exceeds(value: object, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether a parsed JSON value nests containers deeper than `limit` (no recursion)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: object = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children  # type: ignore[attr-defined]
                     if isinstance(child, (dict, list)))
    return False
