"""Per-request sampling parameters (torch-free; the router validates with the same code)."""

from __future__ import annotations

from dataclasses import dataclass, field

from splitserve.common.request_rules import (
    GREEDY_TEMPERATURE_EPS,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_TEMPERATURE,
    MIN_TOP_P,
    UINT32_MAX,
    UINT64_MAX,
    check_finite,
    check_text,
)
from splitserve.common.structured_output import StructuredOutput

_MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS_ENTRIES = 300


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops.

    temperature 0 (or below GREEDY_TEMPERATURE_EPS) is greedy. top_k 0 (or -1) disables top-k; top_p 1 and min_p 0 disable
    those filters. `stop` strings are matched on the detokenized text and never emitted.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; n >= 0: the chosen token plus the top n
    skip_special_tokens: bool = True
    presence_penalty: float = 0.0  # [-2, 2], on tokens present in the output so far
    frequency_penalty: float = 0.0  # [-2, 2], times each token's count in the output
    repetition_penalty: float = 1.0  # (0, 2], on tokens of the prompt and the output
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100])
    # The grammar the output must follow (structured output); None: free text.
    structured_output: StructuredOutput | None = None
    extra: dict[str, object] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        # Accept lists from callers; store tuples so params stay hashable and immutable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        bias = self.logit_bias
        items = bias.items() if isinstance(bias, dict) else bias
        object.__setattr__(self, "logit_bias",
                           tuple(sorted((int(t), float(b)) for t, b in items)))
        if 0.0 < self.top_p < MIN_TOP_P:
            object.__setattr__(self, "top_p", MIN_TOP_P)
        self.validate()

    def validate(self) -> None:
        """ValueError naming the first bad field (request_rules: the rules router and
        workers share)."""
        if not isinstance(self.max_tokens, int) or not 1 <= self.max_tokens <= UINT32_MAX:
            raise ValueError(f"max_tokens must be an integer in [1, {UINT32_MAX}], "
                             f"got {self.max_tokens!r}")
        for name in ("temperature", "top_p", "min_p"):
            check_finite(name, getattr(self, name))
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE:g}], "
                             f"got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.top_k <= UINT32_MAX:
            raise ValueError(f"top_k must be in [0, {UINT32_MAX}] (0 or -1 disables it), "
                             f"got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None and not 0 <= self.seed <= UINT64_MAX:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
        if self.logprobs is not None and not 0 <= self.logprobs <= _MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {_MAX_TOP_LOGPROBS}], got {self.logprobs}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not s or len(s) > MAX_STOP_STRING_CHARS:
                raise ValueError(f"stop strings must have 1 to {MAX_STOP_STRING_CHARS} "
                                 "characters")
            check_text("a stop string", s)
        if any(not 0 <= t <= UINT32_MAX for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be in [0, 2**32)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            check_finite(name, value)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        check_finite("repetition_penalty", self.repetition_penalty)
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"logit_bias has {len(self.logit_bias)} entries; at most "
                             f"{MAX_LOGIT_BIAS_ENTRIES}")
        for token_id, value in self.logit_bias:
            check_finite("a logit_bias value", value)
            if not 0 <= token_id <= UINT32_MAX or not -100.0 <= value <= 100.0:
                raise ValueError(f"logit_bias entries must map token ids to [-100, 100], "
                                 f"got {token_id}: {value}")
        if self.structured_output is not None:
            self.structured_output.validate()

    @property
    def adjusts_logits(self) -> bool:
        """Penalties or biases change the logits before sampling (greedy rows too)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias
                    or self.repetition_penalty != 1.0)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS or self.top_k == 1
