"""Paced streams (Andes, issue 17): the delivery rate a request may ask for. Torch-free.

A rate is tokens per second, or one of the named speeds below, resolved to tokens per
second by the SDK and the HTTP API before it goes on the wire (the proto carries only the
number, GenerateRequest.stream_pace_tokens_per_s). 0 means "not paced": tokens go out as
fast as the batch makes them.

The named speeds assume about 1.3 tokens per English word (SmolLM2's and Llama's
tokenizers on prose): a reader at about 230 words per minute reads some 5 tokens per
second; speech at about 140 words per minute is some 3; skimming at about 460 some 10.
"""

from __future__ import annotations

import math

NAMED_PACES: dict[str, float] = {"speaking": 3.0, "reading": 5.0, "skimming": 10.0}
# Faster than this a pace saves nothing on any batch we run; the bound also keeps the
# value well inside float32 on the wire.
MAX_TOKENS_PER_S = 1000.0


def check_stream_pace(tokens_per_s: float, name: str = "stream_pace_tokens_per_s") -> None:
    """ValueError unless `tokens_per_s` is 0 (not paced) or in (0, MAX_TOKENS_PER_S]."""
    if not math.isfinite(tokens_per_s) or not 0.0 <= tokens_per_s <= MAX_TOKENS_PER_S:
        raise ValueError(f"{name} must be 0 (not paced) or a rate in tokens/s up to "
                         f"{MAX_TOKENS_PER_S:g}, got {tokens_per_s!r}")


def resolve_stream_pace(value: float | str | None, name: str = "stream_pace") -> float:
    """Tokens per second for a pace given as a number or a named speed; None -> 0 (not
    paced). ValueError names the field and the accepted values."""
    if value is None:
        return 0.0
    if isinstance(value, str):
        if value not in NAMED_PACES:
            names = ", ".join(repr(n) for n in NAMED_PACES)
            raise ValueError(f"{name} must be a rate in tokens/s or one of {names}, "
                             f"got {value!r}")
        return NAMED_PACES[value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number (tokens/s) or a named speed, "
                         f"got {type(value).__name__}")
    try:
        rate = float(value)
    except OverflowError:  # an integer too large for a float
        raise ValueError(f"{name} must be a finite rate in tokens/s, got an integer of "
                         f"{len(str(value))} digits") from None
    check_stream_pace(rate, name)
    return rate
