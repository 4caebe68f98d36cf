"""What the engine returns: per-step deltas (for workers and streaming) and whole results."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.sampler import TokenLogprobs


@dataclass(slots=True)
class StepOutput:
    """One request's progress in one engine step."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort" when finished
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_cached_tokens: int = 0


@dataclass(slots=True)
class RequestOutput:
    """A finished (or aborted) request, as LLM.generate returns it."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprobs] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
