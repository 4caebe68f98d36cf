"""Per-request records and the summary metrics computed from them.

Times in a RequestRecord are seconds since the run's start (time.perf_counter() based, taken
by the client); metrics are milliseconds. Definitions, per request, all measured from the
moment the request was sent (`send_s`, not its scheduled arrival, so client-side queueing
behind --concurrency is excluded; `scheduled_s` keeps it visible):

- TTFT = first token-bearing chunk - send.
- E2E = end of the stream - send.
- TPOT = (E2E - TTFT) / (output_tokens - 1); undefined for one output token.
- ITL: for every token-bearing chunk after the first, the gap since the previous one,
  spread evenly over the chunk's k tokens (k values of gap / k), so a server that sends
  several tokens per chunk is not credited with k - 1 free tokens nor charged one huge gap.
  Extra tokens in the first chunk are part of TTFT and add no ITL value. HTTP targets
  count each content chunk as one token here (the usual one-token-per-event streaming).

Percentiles interpolate linearly between order statistics (numpy's default method).
Goodput = completed requests meeting every objective in the SLO / duration; a request with
one output token has no TPOT and passes a TPOT objective; with no objectives every
completed request counts.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

SLO_KEYS = ("ttft_ms", "tpot_ms", "e2e_ms")
PERCENTILES = (50.0, 90.0, 99.0)


@dataclass(slots=True)
class RequestRecord:
    """What the client saw of one request; filled in as it happens."""

    index: int  # position in the workload stream
    tag: str = ""
    scheduled_s: float = 0.0  # when it was due (open loop) or released (closed loop)
    send_s: float | None = None
    chunk_s: list[float] = field(default_factory=list)  # arrival of each token-bearing chunk
    chunk_tokens: list[int] = field(default_factory=list)  # tokens in each of those chunks
    end_s: float | None = None
    prompt_tokens: int = 0
    prompt_tokens_reported: bool = False  # from the server's usage (else our estimate)
    output_tokens: int = 0  # the server's usage when reported, else sum(chunk_tokens)
    status: str = "pending"  # pending | ok | error | cancelled
    error: str = ""
    finish_reason: str | None = None
    server_timings: dict[str, Any] | None = None  # SplitServe's per-phase timings (gRPC)
    # Sent again because a pooled keep-alive connection was closed under it before any
    # response came: the harness's connection reuse, not the server's failure.
    connection_retries: int = 0

    def mark_sent(self, now: float) -> None:
        self.send_s = now

    def add_chunk(self, now: float, num_tokens: int) -> None:
        if num_tokens > 0:
            self.chunk_s.append(now)
            self.chunk_tokens.append(num_tokens)

    def finish(self, now: float, finish_reason: str | None, output_tokens: int | None = None,
               prompt_tokens: int | None = None) -> None:
        """The stream ended normally; counts given here are the server's (usage)."""
        self.end_s = now
        self.finish_reason = finish_reason
        self.output_tokens = sum(self.chunk_tokens) if output_tokens is None else output_tokens
        if prompt_tokens is not None:
            self.prompt_tokens, self.prompt_tokens_reported = prompt_tokens, True
        self.status = "ok"

    def fail(self, now: float, error: str, status: str = "error") -> None:
        self.end_s = now
        self.status = status
        self.error = error
        if not self.output_tokens:
            self.output_tokens = sum(self.chunk_tokens)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def ttft_ms(self) -> float | None:
        if self.send_s is None or not self.chunk_s:
            return None
        return (self.chunk_s[0] - self.send_s) * 1e3

    @property
    def e2e_ms(self) -> float | None:
        if self.send_s is None or self.end_s is None:
            return None
        return (self.end_s - self.send_s) * 1e3

    @property
    def tpot_ms(self) -> float | None:
        ttft, e2e = self.ttft_ms, self.e2e_ms
        if ttft is None or e2e is None or self.output_tokens < 2:
            return None
        return (e2e - ttft) / (self.output_tokens - 1)

    def itl_ms(self) -> list[float]:
        gaps: list[float] = []
        for prev, now, k in zip(self.chunk_s, self.chunk_s[1:], self.chunk_tokens[1:],
                                strict=False):
            gaps += [(now - prev) * 1e3 / k] * k
        return gaps


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (0..100), linear interpolation between order statistics."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def stats(values: list[float], percentiles: tuple[float, ...] = PERCENTILES
          ) -> dict[str, float | int | None]:
    """count, mean, min, max and pNN of values (None when there are none)."""
    out: dict[str, float | int | None] = {"count": len(values)}
    out["mean"] = sum(values) / len(values) if values else None
    for p in percentiles:
        out[f"p{p:g}"] = percentile(values, p) if values else None
    out["min"] = min(values) if values else None
    out["max"] = max(values) if values else None
    return out


def parse_slo(text: str | None) -> dict[str, float]:
    """'ttft_ms=500,tpot_ms=50' -> {'ttft_ms': 500.0, 'tpot_ms': 50.0} (any subset of
    SLO_KEYS; bare 'ttft', 'tpot', 'e2e' are accepted too)."""
    slo: dict[str, float] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        key = key if key.endswith("_ms") else key + "_ms"
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"bad SLO {item!r}: expected key=ms with key in {SLO_KEYS}")
        slo[key] = float(value)
        if not slo[key] > 0:
            raise ValueError(f"SLO {key} must be > 0 ms, got {value}")
    return slo


def meets_slo(record: RequestRecord, slo: dict[str, float]) -> bool:
    if not record.ok:
        return False
    for key, limit in slo.items():
        value = getattr(record, key)
        if value is None:
            if key == "tpot_ms":  # one output token: no TPOT to miss
                continue
            return False
        if value > limit:
            return False
    return True


def run_duration_s(records: list[RequestRecord]) -> float:
    """From the run's start to the last request's end (0 when nothing ended)."""
    return max((r.end_s for r in records if r.end_s is not None), default=0.0)


def summarize(records: list[RequestRecord], slo: dict[str, float] | None = None,
              duration_s: float | None = None,
              percentiles: tuple[float, ...] = PERCENTILES) -> dict[str, Any]:
    """Counts, throughputs, latency stats and goodput of one run (JSON-ready)."""
    slo = slo or {}
    duration = run_duration_s(records) if duration_s is None else duration_s
    done = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens for r in done)
    good = sum(meets_slo(r, slo) for r in done)

    def rate(x: float) -> float:
        return x / duration if duration > 0 else 0.0

    def collect(name: str) -> list[float]:
        return [v for r in done if (v := getattr(r, name)) is not None]

    status = Counter(r.status for r in records)
    return {
        "num_requests": len(records),
        "completed": status["ok"],
        "failed": status["error"],
        "cancelled": status["cancelled"],
        "duration_s": duration,
        "total_prompt_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "prompt_tokens_reported": all(r.prompt_tokens_reported for r in done),
        "request_throughput": rate(len(done)),
        "output_throughput": rate(out_tokens),
        "total_token_throughput": rate(in_tokens + out_tokens),
        "ttft_ms": stats(collect("ttft_ms"), percentiles),
        "tpot_ms": stats(collect("tpot_ms"), percentiles),
        "itl_ms": stats([g for r in done for g in r.itl_ms()], percentiles),
        "e2e_ms": stats(collect("e2e_ms"), percentiles),
        # How long a failure took to arrive (a rejection at overload should be immediate).
        "failed_e2e_ms": stats([v for r in records if r.status == "error"
                                and (v := r.e2e_ms) is not None], percentiles),
        # Sent later than due: waiting for a --concurrency slot or a previous turn, or a
        # client too busy to keep the schedule (then the offered rate was not achieved).
        "send_lag_ms": stats([(r.send_s - r.scheduled_s) * 1e3 for r in records
                              if r.send_s is not None], percentiles),
        "slo": dict(slo),
        "good_requests": good,
        "goodput": rate(good),
        "errors": dict(Counter(r.error for r in records if r.error).most_common(5)),
        "connection_retries": sum(r.connection_retries for r in records),
    }


def summarize_by_tag(records: list[RequestRecord], slo: dict[str, float] | None = None,
                     duration_s: float | None = None) -> dict[str, dict[str, Any]]:
    """summarize() per workload tag (rates over the whole run's duration); {} for one tag."""
    tags = sorted({r.tag for r in records})
    if len(tags) < 2:
        return {}
    duration = run_duration_s(records) if duration_s is None else duration_s
    return {tag: summarize([r for r in records if r.tag == tag], slo, duration)
            for tag in tags}
