"""What a client gets back: usage, timings, streamed chunks, whole completions, models.

Torch-free; the SDK (`splitserve.client`) and the load-testing harness use them, and
`splitserve.common.convert.router` builds them from the router's messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from splitserve.common.outputs import TokenLogprobs


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of a finished request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from a prefix cache


@dataclass(frozen=True, slots=True)
class Timings:
    """Where a request's time went, as the router and workers measured it (milliseconds)."""

    router_queue_ms: float = 0.0
    prefill_queue_ms: float = 0.0
    prefill_compute_ms: float = 0.0
    kv_transfer_ms: float = 0.0
    decode_queue_ms: float = 0.0
    ttft_ms: float = 0.0
    e2e_ms: float = 0.0
    prefill_worker_id: str = ""
    decode_worker_id: str = ""
    prefill_local: bool = False  # the decode worker prefilled the prompt itself
    kv_transfer_bytes: int = 0
    num_resumes: int = 0  # times it moved on to other workers (lost or draining worker)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One served model, as ListModels reports it."""

    id: str
    max_model_len: int
    block_size: int
    num_prefill_workers: int
    num_decode_workers: int


@dataclass(frozen=True, slots=True)
class Chunk:
    """One streamed piece of a completion: the tokens and text produced since the last one.

    finish_reason, usage and timings are set on the last chunk only.
    """

    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    usage: Usage | None = None
    timings: Timings | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token_ids entry
    request_id: str = ""
    stop_string: str = ""  # with "stop": the stop string that matched
    error_message: str = ""  # with "error": what failed


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole completion, assembled from its chunks."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "abort" | "error"
    usage: Usage
    timings: Timings
    logprobs: list[TokenLogprobs] | None = None  # None unless logprobs= was requested
    stop_string: str = ""
    error_message: str = ""
