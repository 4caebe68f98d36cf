"""A worker's engine step time, measured online, and the latencies it predicts.

Every engine step is timed with what it held: `num_seqs` sequences (decodes and prompt
chunks) and `prompt_tokens` prompt tokens. The model is

    step_ms = base_ms + per_seq_ms * num_seqs + per_prompt_token_ms * prompt_tokens

fitted in two parts, so that a worker that never decodes (a prefill worker) or never varies
its batch still gets a usable model: base and per-sequence costs from decode-only steps by
exponentially weighted least squares over the batch size (a flat line when the batch never
varied), and the per-prompt-token cost as the exponentially weighted mean of what prompt
steps took beyond that line, per prompt token. Workers publish the fitted model with their
load (WorkerLoadReport); the router predicts from it the time to first token and the time
per output token a request would see on each route (router.latency).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

_DECAY = 0.98  # weight of the past per new sample (~50 samples of memory)
_MIN_DECODE_SAMPLES = 4
_MIN_PROMPT_SAMPLES = 2


@dataclass(frozen=True, slots=True)
class StepTimeModel:
    """Fitted step costs (milliseconds) and the worker's prompt-token budget per step."""

    base_ms: float
    per_seq_ms: float
    per_prompt_token_ms: float
    token_budget: int

    def is_finite(self) -> bool:
        """Every cost a finite number (a load report drops a model that is not:
        cluster_types.WorkerLoadReport)."""
        return all(math.isfinite(v) for v in (self.base_ms, self.per_seq_ms,
                                               self.per_prompt_token_ms))

    def step_ms(self, num_seqs: int, prompt_tokens: int = 0) -> float:
        return (self.base_ms + self.per_seq_ms * num_seqs
                + self.per_prompt_token_ms * prompt_tokens)

    def prefill_ms(self, prompt_tokens: int, running: int) -> float:
        """Time to compute `prompt_tokens` queued prompt tokens, in chunks of the token
        budget, each step shared with `running` decoding sequences."""
        if prompt_tokens <= 0:
            return 0.0
        steps = math.ceil(prompt_tokens / max(1, self.token_budget))
        return (steps * (self.base_ms + self.per_seq_ms * (running + 1))
                + self.per_prompt_token_ms * prompt_tokens)


class StepTimeFit:
    """Accumulates step timings (the engine's thread only); model() is the current fit."""

    def __init__(self, token_budget: int) -> None:
        self.token_budget = token_budget
        # Exponentially weighted sums over decode-only steps: weight, x, x^2, y, x*y.
        self._w = self._x = self._xx = self._y = self._xy = 0.0
        self._decode_samples = 0
        self._per_token_ms = 0.0  # EW mean, bias-corrected by _token_weight
        self._token_weight = 0.0
        self._prompt_samples = 0

    def observe(self, seconds: float, num_seqs: int, prompt_tokens: int) -> None:
        if num_seqs <= 0 or not seconds >= 0:
            return
        ms = seconds * 1e3
        if prompt_tokens <= 0:
            self._w = _DECAY * self._w + 1.0
            self._x = _DECAY * self._x + num_seqs
            self._xx = _DECAY * self._xx + num_seqs * num_seqs
            self._y = _DECAY * self._y + ms
            self._xy = _DECAY * self._xy + num_seqs * ms
            self._decode_samples += 1
            return
        base, per_seq = self._line()
        beyond = max(0.0, ms - base - per_seq * num_seqs)
        self._per_token_ms = _DECAY * self._per_token_ms + beyond / prompt_tokens
        self._token_weight = _DECAY * self._token_weight + 1.0
        self._prompt_samples += 1

    def _line(self) -> tuple[float, float]:
        """(base_ms, per_seq_ms) of the decode-only steps; (0, 0) before enough of them."""
        if self._decode_samples < _MIN_DECODE_SAMPLES or self._w <= 0:
            return 0.0, 0.0
        mean_x, mean_y = self._x / self._w, self._y / self._w
        var = self._xx / self._w - mean_x * mean_x
        per_seq = (self._xy / self._w - mean_x * mean_y) / var if var > 1e-6 else 0.0
        per_seq = max(0.0, per_seq)
        base = mean_y - per_seq * mean_x
        if base < 0.0:  # a line through the origin rather than a negative step cost
            base, per_seq = 0.0, mean_y / mean_x
        return base, per_seq

    def model(self) -> StepTimeModel | None:
        """The fit, or None until both kinds of step have been seen enough (a worker that
        only prefills gets a model once it has prefilled: base and per-sequence 0)."""
        if self._prompt_samples < _MIN_PROMPT_SAMPLES:
            return None
        base, per_seq = self._line()
        return StepTimeModel(base, per_seq, self._per_token_ms / self._token_weight,
                             self.token_budget)
