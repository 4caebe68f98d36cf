"""The decode side of a paced stream (Andes): when a paced sequence may sit out a step.

A paced sequence's reader is modelled exactly as the router's pacer (router/pacing.py)
releases tokens: each token one interval (1 / tokens_per_s) after the previous one, or as
soon as it is produced if that is later. `read_until` is then the time at which the reader
will have read every token produced so far, and the tokens still unread at time t are
ceil((read_until - t) * tokens_per_s). While more than `buffer_tokens` are unread the
sequence sits out decode steps (keeping its KV and its place in the batch), so the batch
is smaller and every other request steps faster; it resumes at
`read_until - buffer_tokens / tokens_per_s`.

The clock starts at the sequence's first output token on this engine (the prefill
worker's first token when it joins the batch, or its own first sample). The reader runs on
wall time, not on steps: a sequence that waited (full batch, KV shortage, preemption and
recompute) finds its reader further along, so it is less far ahead, or behind, and runs
every step until it is ahead again. The model is never later than the router's real
reader, only earlier (network delay, a resumed request whose earlier tokens are still
buffered at the router, a stall the router's pacer absorbed by shifting later tokens): then
the engine believes the reader is further along than it is and produces more, never less,
so an error fills the router's buffer rather than starving the reader.
Pure Python (no torch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# How far ahead a paced stream may run, in seconds of its pace (at least _MIN_BUFFER_TOKENS
# tokens): enough to ride out a slow step (a long prompt's chunk in the same batch, a
# recompute after preemption) without the reader waiting.
DEFAULT_BUFFER_S = 1.0
_MIN_BUFFER_TOKENS = 2


def buffer_tokens(tokens_per_s: float, buffer_s: float) -> int:
    """Tokens a stream at `tokens_per_s` may run ahead of its reader."""
    return max(_MIN_BUFFER_TOKENS, math.ceil(tokens_per_s * buffer_s))


@dataclass(slots=True)
class PaceClock:
    """One paced sequence's reader model. Times are time.monotonic() seconds."""

    tokens_per_s: float
    buffer_tokens: int
    read_until: float | None = None  # None until the first output token

    def __post_init__(self) -> None:
        if not self.tokens_per_s > 0 or self.buffer_tokens < 1:
            raise ValueError("a pace needs tokens_per_s > 0 and buffer_tokens >= 1")

    def on_token(self, now: float) -> None:
        """A token was produced at `now`: the reader reads it one interval after the
        previous one, or now if it has read everything already."""
        if self.read_until is None:
            self.read_until = now
        else:
            self.read_until = max(now, self.read_until + 1.0 / self.tokens_per_s)

    def unread_tokens(self, now: float) -> int:
        if self.read_until is None or self.read_until <= now:
            return 0
        return math.ceil((self.read_until - now) * self.tokens_per_s - 1e-9)

    @property
    def resume_time(self) -> float:
        """The earliest time the sequence decodes again (-inf: at once)."""
        if self.read_until is None:
            return -math.inf
        return self.read_until - self.buffer_tokens / self.tokens_per_s

    def sits_out(self, now: float) -> bool:
        """More than buffer_tokens produced and still unread at `now`."""
        return now < self.resume_time
