"""The router's Prometheus metrics, served at GET /metrics on its HTTP port.

Every request admitted by the router, whether it came over gRPC or HTTP, is observed by
one `RequestObserver` (the shared pipeline in router.service wraps the request's emit
callback with it), so both front ends feed the same series:

- latency histograms (seconds, router clock): TTFT (arrival -> first token sent), E2E
  (arrival -> last chunk), TPOT (per request: (last token - first token) / (tokens - 1)),
  ITL (per output token after the first: the gap since the previous token-bearing chunk,
  split evenly over the chunk's tokens; so its count is tokens - 1 and its sum the
  request's decode time);
- per-phase histograms from the last chunk's RequestTimings (router queue, prefill queue,
  prefill compute, KV transfer (remote prefill only), decode queue);
- counters: requests by finish reason, admission rejections by reason, prompt /
  generation / cached tokens, KV bytes moved for routed requests, prefills by location;
- gauges: requests in flight and queued in admission.

Besides the series, three windows keep the last minutes' samples (seconds) for
percentiles over a sliding window (router.pd_control): `recent_ttft` (a sample per first
token), `recent_tpot` (a sample per finished request: its whole TPOT) and
`recent_live_tpot` (a sample per LIVE_TPOT_SEGMENT_S of each request's decoding: the mean
gap between its tokens in that stretch, and one for the stretch it finished in). A long
request's TPOT is known only at its end and averages its whole life; the live samples say
how fast the requests decode now.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from splitserve.common.auth import ANONYMOUS
from splitserve.common.convert.common import FINISH_REASON_NAMES
from splitserve.common.metrics import (
    E2E_BUCKETS_S,
    PHASE_BUCKETS_S,
    PREFIX,
    TOKEN_LATENCY_BUCKETS_S,
    TTFT_BUCKETS_S,
)
from splitserve.router.admission import AdmissionController
from splitserve.router.latency_window import LatencyWindow
from splitserve.router.relay import RequestTrace
from splitserve.v1 import common_pb2, router_pb2

Emit = Callable[[router_pb2.GenerateResponse], Awaitable[None]]
METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST
# A decoding request adds a live TPOT sample this often (router clock).
LIVE_TPOT_SEGMENT_S = 1.0

# RequestTimings field (milliseconds) -> `phase` label.
PHASES = {
    "router_queue_ms": "router_queue",
    "prefill_queue_ms": "prefill_queue",
    "prefill_compute_ms": "prefill_compute",
    "kv_transfer_ms": "kv_transfer",
    "decode_queue_ms": "decode_queue",
}


class RouterMetrics:
    """The router's metric objects, on a registry of their own."""

    def __init__(self, admission: AdmissionController | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Arrival at the router "
                              "to the first token sent.", buckets=TTFT_BUCKETS_S, registry=r)
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds", "Per request: time "
                              "from the first to the last token / (output tokens - 1).",
                              buckets=TOKEN_LATENCY_BUCKETS_S, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Gap between output "
                             "tokens as relayed (one observation per token after the first).",
                             buckets=TOKEN_LATENCY_BUCKETS_S, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Arrival at the router "
                             "to the last chunk.", buckets=E2E_BUCKETS_S, registry=r)
        self.phase = Histogram(PREFIX + "request_phase_seconds", "Time a finished request "
                               "spent in each phase (its last chunk's timings).",
                               ["phase"], buckets=PHASE_BUCKETS_S, registry=r)
        self.requests = Counter(PREFIX + "requests", "Admitted requests that ended, by finish "
                                "reason (abort: client gone or deadline).", ["finish_reason"],
                                registry=r)
        self.rejections = Counter(PREFIX + "admission_rejections", "Requests refused by "
                                  "admission control.", ["reason"], registry=r)
        self.slow_clients = Counter(PREFIX + "slow_client_cutoffs", "Streams cut off because "
                                    "the client stopped reading (client_write_timeout_s).",
                                    registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of finished "
                                     "requests.", registry=r)
        self.cached_tokens = Counter(PREFIX + "prompt_cached_tokens", "Prompt tokens of "
                                     "finished requests served from a prefix cache.", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Output tokens relayed "
                                         "to clients.", registry=r)
        self.kv_bytes = Counter(PREFIX + "routed_kv_transfer_bytes", "KV bytes moved from "
                                "prefill to decode workers for finished requests.", registry=r)
        self.prefills = Counter(PREFIX + "prefills", "Finished requests by where their prompt "
                                "was prefilled.", ["location"], registry=r)
        self.client_requests = Counter(PREFIX + "client_requests", "Admitted requests that "
                                       "ended, by client (the name of its API key; "
                                       "'anonymous' without keys).", ["client"], registry=r)
        self.client_tokens = Counter(PREFIX + "client_tokens", "Prompt tokens of finished "
                                     "requests and output tokens relayed, by client.",
                                     ["client", "kind"], registry=r)
        self.ttft_prediction_error = Histogram(
            PREFIX + "ttft_prediction_abs_error_seconds", "Admitted requests: |actual TTFT - "
            "the TTFT predicted at arrival| (SLO-aware admission, router.slo).",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=r)
        self.route_ttft_error = Histogram(
            PREFIX + "route_ttft_prediction_abs_error_seconds", "Latency routing: |time from "
            "dispatch to the first token - the chosen route's predicted TTFT| (router.latency).",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=r)
        self.resumes = Counter(PREFIX + "request_resumes", "Times a request moved on to other "
                               "workers: a worker was lost, or a draining one handed it back.",
                               ["reason"], registry=r)
        for reason in ("prefill_lost", "decode_lost", "decode_drained", "decode_migrated"):
            self.resumes.labels(reason)
        for reason in FINISH_REASON_NAMES.values():
            self.requests.labels(reason)
        for reason in ("over_capacity", "draining", "queue_timeout"):
            self.rejections.labels(reason)
        for location in ("local", "remote"):
            self.prefills.labels(location)
        self.inflight = Gauge(PREFIX + "requests_inflight", "Requests holding an admission "
                              "slot.", registry=r)
        self.queued = Gauge(PREFIX + "requests_queued", "Requests waiting for an admission "
                            "slot.", registry=r)
        self.recent_ttft = LatencyWindow()
        self.recent_tpot = LatencyWindow()
        self.recent_live_tpot = LatencyWindow()
        if admission is not None:
            self.inflight.set_function(lambda: admission.num_inflight)
            self.queued.set_function(lambda: admission.num_queued)

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)

    def observer(self, trace: RequestTrace, client: str = ANONYMOUS) -> RequestObserver:
        return RequestObserver(self, trace, client)


class RequestObserver:
    """Observes one admitted request's chunks; `end` records how it ended (once)."""

    def __init__(self, metrics: RouterMetrics, trace: RequestTrace,
                 client: str = ANONYMOUS) -> None:
        self._m = metrics
        self._trace = trace
        self._client = client
        self._first_token: float | None = None
        self._last_token: float | None = None
        self._num_tokens = 0
        # The live TPOT stretch so far: when it began (a token's time) and the tokens then.
        self._segment_at = 0.0
        self._segment_tokens = 0
        self._ended = False
        # Per chunk, so looked up once: prometheus_client's labels() takes a lock and
        # builds a key on every call.
        self._output_tokens = metrics.client_tokens.labels(client, "output")

    def wrap(self, emit: Emit) -> Emit:
        async def observed(chunk: router_pb2.GenerateResponse) -> None:
            self.chunk(chunk)
            await emit(chunk)

        return observed

    def chunk(self, chunk: router_pb2.GenerateResponse) -> None:
        k = len(chunk.token_ids)
        if k:
            now = time.monotonic()
            if self._last_token is None:
                self._first_token = now
                self._m.ttft.observe(now - self._trace.arrival)
                self._m.recent_ttft.add(now - self._trace.arrival, now)
                gaps = [0.0] * (k - 1)  # tokens that came with the first one
                self._segment_at, self._segment_tokens = now, k
            else:
                gaps = [(now - self._last_token) / k] * k
            for gap in gaps:
                self._m.itl.observe(gap)
            self._last_token = now
            self._num_tokens += k
            if now - self._segment_at >= LIVE_TPOT_SEGMENT_S:
                self._live_sample(now)
            self._m.generation_tokens.inc(k)
            self._output_tokens.inc(k)
        if chunk.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            self._finished(chunk)

    def _live_sample(self, now: float) -> None:
        """The mean gap between this request's tokens since the stretch began, as a live TPOT
        sample taken at `now`; the next stretch begins at the last token."""
        assert self._last_token is not None
        tokens = self._num_tokens - self._segment_tokens
        if tokens > 0:
            self._m.recent_live_tpot.add((self._last_token - self._segment_at) / tokens, now)
        self._segment_at, self._segment_tokens = self._last_token, self._num_tokens

    def _finished(self, chunk: router_pb2.GenerateResponse) -> None:
        m = self._m
        if self._last_token is not None:
            self._live_sample(time.monotonic())  # the stretch it finished in
        self.end(FINISH_REASON_NAMES.get(chunk.finish_reason, "error"))
        timings = chunk.timings
        m.e2e.observe(timings.e2e_ms / 1000.0)
        if self._num_tokens > 1 and self._first_token is not None:
            assert self._last_token is not None
            tpot = (self._last_token - self._first_token) / (self._num_tokens - 1)
            m.tpot.observe(tpot)
            m.recent_tpot.add(tpot)
        for field, phase in PHASES.items():
            if phase == "kv_transfer" and timings.prefill_local:
                continue
            m.phase.labels(phase).observe(getattr(timings, field) / 1000.0)
        m.prompt_tokens.inc(chunk.usage.prompt_tokens)
        m.client_tokens.labels(self._client, "prompt").inc(chunk.usage.prompt_tokens)
        m.cached_tokens.inc(chunk.usage.cached_tokens)
        m.kv_bytes.inc(timings.kv_transfer_bytes)
        m.prefills.labels("local" if timings.prefill_local else "remote").inc()

    def end(self, finish_reason: str) -> None:
        """Count the request under `finish_reason` unless it was counted already."""
        if not self._ended:
            self._ended = True
            self._m.requests.labels(finish_reason).inc()
            self._m.client_requests.labels(self._client).inc()
            for reason in self._trace.resumed:
                self._m.resumes.labels(reason).inc()
