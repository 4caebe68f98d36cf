"""What the engine returns: per-step deltas (for workers and streaming) and whole results."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class TokenLogprobs:
    token_id: int
    logprob: float  # natural log, under the model's raw distribution
    top: list[tuple[int, float]]  # the n most likely (token id, logprob), most likely first


@dataclass(slots=True)
class StepOutput:
    """One request's progress in one engine step."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" when finished
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_cached_tokens: int = 0
    error: str = ""  # with "error": what failed


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


# How a decode worker words the end of a request whose KV never came from its prefill
# worker (a broken or cut link, a prefill worker that died mid-send): the router reads it as
# the prefill side's failure and resumes the request elsewhere instead of failing it.
KV_RECEIVE_FAILED = "KV receive failed"
PREFILL_TIMED_OUT = "timed out waiting for the prefill"


def is_prefill_kv_failure(error_message: str) -> bool:
    """Whether a decode worker's error says the request's KV never arrived from P."""
    return error_message.startswith((KV_RECEIVE_FAILED, PREFILL_TIMED_OUT))
