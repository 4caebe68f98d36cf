"""The pure half of relaying a request: text, stop decisions, usage and timings.

The router owns detokenization and stop strings (workers get params without them), so
every output token, the prefill worker's first one included, goes through one
`TokenRelay`. `RequestTrace` collects where the request's time went, from the router's
clock and the workers' reports, and turns it into the RequestTimings of the last chunk.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from splitserve.common.sampling_params import SamplingParams
from splitserve.engine.stop_checker import StopChecker
from splitserve.engine.tokenizer import Tokenizer
from splitserve.v1 import common_pb2, worker_pb2


@dataclass(slots=True)
class RelayStep:
    """What a batch of tokens adds to the client's stream."""

    token_ids: list[int]  # the tokens consumed (those after a finishing token are dropped)
    logprobs: list[common_pb2.TokenLogprob]  # aligned with token_ids when requested
    text: str  # text delta, stop strings removed; may hold back a possible stop prefix
    finish_reason: str | None = None  # "stop" | "length" when the router's checks end it
    stop_string: str = ""  # the stop string that matched, with finish_reason "stop"


class TokenRelay:
    """Router-side detokenization and stop checks for one request's output tokens."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        max_model_len: int,
    ) -> None:
        self._params = params
        self._eos = frozenset() if params.ignore_eos else tokenizer.eos_token_ids
        self._checker = StopChecker(
            tokenizer, list(prompt_token_ids), params, tokenizer.eos_token_ids, max_model_len
        )
        self._num_chars = 0  # characters of the checker's text handed out so far
        self.output_token_ids: list[int] = []  # consumed, the first one included
        self.finish_reason: str | None = None
        self.stop_string = ""

    @property
    def num_tokens(self) -> int:
        """Output tokens consumed, the first one included."""
        return len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(
        self,
        token_ids: Sequence[int],
        logprobs: Sequence[common_pb2.TokenLogprob] = (),
    ) -> RelayStep:
        """Consume tokens up to (and including) the first that ends the request."""
        if self.finished:
            raise RuntimeError("TokenRelay.add after the request finished")
        step = RelayStep([], [], "")
        pieces: list[str] = []
        for i, token_id in enumerate(token_ids):
            delta, reason = self._checker.add(token_id)
            pieces.append(delta)
            step.token_ids.append(token_id)
            if i < len(logprobs):
                step.logprobs.append(logprobs[i])
            self.output_token_ids.append(token_id)
            if reason is not None:
                self.finish_reason = step.finish_reason = reason
                if reason == "stop" and token_id not in self._eos:
                    if token_id not in self._params.stop_token_ids:
                        self.stop_string = step.stop_string = self._matched_stop_string()
                break
        step.text = "".join(pieces)
        self._num_chars += len(step.text)
        return step

    def finish(self) -> str:
        """The request ended for another reason (a worker finished or failed): the text
        still held back (a possible stop-string prefix, an incomplete character)."""
        if self.finished:
            return ""
        text = self._checker.text[self._num_chars :] + self._checker.detokenizer.flush()
        self._num_chars += len(text)
        return text

    def _matched_stop_string(self) -> str:
        # The checker truncated its text right before the stop string; the detokenizer's
        # text still holds it at that position.
        full = self._checker.detokenizer.text
        position = len(self._checker.text)
        matches = [s for s in self._params.stop if full.startswith(s, position)]
        return matches[0] if matches else ""


def _ms(start: float | None, end: float | None) -> float:
    if start is None or end is None:
        return 0.0
    return max(0.0, (end - start) * 1000.0)


@dataclass
class RequestTrace:
    """Where one request's time went. Times are `time.monotonic()` seconds."""

    arrival: float = field(default_factory=time.monotonic)
    dispatched: float | None = None  # first call to a worker (D.Admit)
    first_token: float | None = None  # first token sent to the client
    finished: float | None = None  # last chunk built
    prefill_worker_id: str = ""
    decode_worker_id: str = ""
    prefill_local: bool = False
    num_cached_tokens: int = 0  # prompt tokens the prefilling worker took from its cache
    prefill_queue_ms: float = 0.0
    prefill_compute_ms: float = 0.0
    kv_transfer_ms: float = 0.0
    decode_queue_ms: float = 0.0
    kv_transfer_bytes: int = 0
    # Latency routing: the TTFT the chosen route was predicted to give, from dispatch.
    predicted_ttft_s: float | None = None
    # Why the request moved on each time: prefill_lost | decode_lost | decode_drained
    # (recomputed) | decode_migrated (its KV shipped from the draining worker).
    resumed: list[str] = field(default_factory=list)

    def add_prefill(self, response: worker_pb2.PrefillResponse) -> None:
        """A remote prefill worker's report."""
        self.prefill_worker_id = response.prefill_worker_id or self.prefill_worker_id
        self.num_cached_tokens = response.num_cached_tokens
        self.prefill_queue_ms = response.queue_ms
        self.prefill_compute_ms = response.compute_ms
        self.kv_transfer_ms = response.kv_transfer_ms
        self.kv_transfer_bytes = response.kv_transfer_bytes

    def add_decode(self, timings: worker_pb2.DecodeTimings) -> None:
        """The decode worker's report (its last DecodeOutput)."""
        self.decode_queue_ms = timings.decode_queue_ms
        if self.prefill_local:
            self.prefill_queue_ms = timings.prefill_queue_ms
            self.prefill_compute_ms = timings.prefill_compute_ms
        elif not self.kv_transfer_bytes:
            self.kv_transfer_bytes = timings.kv_transfer_bytes

    def timings(self) -> common_pb2.RequestTimings:
        end = self.finished if self.finished is not None else time.monotonic()
        return common_pb2.RequestTimings(
            router_queue_ms=_ms(self.arrival, self.dispatched),
            prefill_queue_ms=self.prefill_queue_ms,
            prefill_compute_ms=self.prefill_compute_ms,
            kv_transfer_ms=0.0 if self.prefill_local else self.kv_transfer_ms,
            decode_queue_ms=self.decode_queue_ms,
            ttft_ms=_ms(self.arrival, self.first_token),
            e2e_ms=_ms(self.arrival, end),
            prefill_worker_id=self.prefill_worker_id,
            decode_worker_id=self.decode_worker_id,
            prefill_local=self.prefill_local,
            kv_transfer_bytes=0 if self.prefill_local else self.kv_transfer_bytes,
            num_resumes=len(self.resumed),
        )


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> common_pb2.Usage:
    return common_pb2.Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        cached_tokens=min(cached_tokens, prompt_tokens),
    )
