"""Reading NVIDIA aiperf's aggregate results (`profile_export_aiperf.json`) as our summary.

`bench compare` accepts the file `aiperf profile` writes into its --output-artifact-dir as it
is, beside our results and vLLM's (checked against aiperf 0.13, export schema_version 1.4).
That file is one JSON object: scalars (`aiperf_version`, `schema_version`, `start_time`, ...),
`input_config` (the run's settings, `slos` among them), `error_summary`, and one object per
metric tag, e.g. `"time_to_first_token": {"unit": "ms", "avg", "min", "max", "std", "count",
"sum", "p1" ... "p99"}`; counters and rates carry only `avg` (`"request_count": {"unit":
"requests", "avg": 16.0}`). Units are converted, not assumed.

Mapping (aiperf tag -> our summary key) and where the definitions differ from metrics.py:

- time_to_first_token -> ttft_ms: the first chunk with content minus the request's start.
  Same definition (role-only, usage-only and [DONE] chunks do not count in either).
- inter_token_latency -> tpot_ms. aiperf's "ITL" is per request, (request latency - TTFT) /
  (output tokens - 1), one value per request: that is our TPOT, not our ITL. Ours divides
  (end of stream - TTFT), see e2e below.
- inter_chunk_latency -> itl_ms: every gap between consecutive content chunks, pooled over
  requests. Our ITL spreads a gap over the chunk's k tokens (k values of gap / k); the two
  agree when every chunk carries one token, as SplitServe's nearly all do (over HTTP our
  client counts each content chunk as one token too, see metrics.py).
- request_latency -> e2e_ms: to the last content chunk; ours runs to the end of the stream
  (the usage chunk and [DONE] after it), so ours is longer by that tail.
- Percentiles: aiperf's TTFT, ITL and request-latency distributions include failed requests
  that got content; ours are over completed requests only. `avg` is our `mean`; aiperf's
  pNN also interpolate linearly between order statistics.
- request_count -> completed (valid requests), error_request_count -> failed (absent when
  none); cancelled is 0 (aiperf counts a cancelled request as an error).
- benchmark_duration -> duration_s: first request's start to last response; ours: run
  start to last request's end. request_throughput, output_token_throughput,
  total_token_throughput and goodput are aiperf's own, each over that duration.
- total_isl / total_osl -> total_prompt_tokens / total_output_tokens. aiperf counts them
  with its client-side tokenizer over the text it sent and got (for chat: without the chat
  template) unless run with --use-server-token-count, when they are the server's usage as
  ours are (then prompt_tokens_reported); the throughputs follow the same counts. Compare
  runs made with that flag.
- input_config.slos -> slo: time_to_first_token, inter_token_latency and request_latency
  become ttft_ms, tpot_ms and e2e_ms; any other objective keeps aiperf's name.
"""

from __future__ import annotations

from typing import Any

# Our latency key -> aiperf's metric tag.
_LATENCIES = (("ttft_ms", "time_to_first_token"), ("tpot_ms", "inter_token_latency"),
              ("itl_ms", "inter_chunk_latency"), ("e2e_ms", "request_latency"))
_SLO_NAMES = {tag: ours for ours, tag in _LATENCIES if ours != "itl_ms"}
# Seconds per unit of a time metric, and per unit of time in a rate ("tokens/sec").
_SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "sec": 1.0, "min": 60.0}
_STATS = ("min", "max", "std")


def is_aiperf_result(data: Any) -> bool:
    return (isinstance(data, dict) and "aiperf_version" in data
            and isinstance(data.get("benchmark_duration"), dict))


def _count(data: dict[str, Any], tag: str) -> int:
    """A counter's value; 0 when absent (aiperf leaves out a zero error count)."""
    metric = data.get(tag)
    return int(metric["avg"]) if isinstance(metric, dict) else 0


def _seconds_per(unit: str, tag: str) -> float:
    if unit not in _SECONDS:
        raise ValueError(f"aiperf metric {tag!r}: unknown time unit {unit!r}")
    return _SECONDS[unit]


def _rate(data: dict[str, Any], tag: str) -> float | None:
    """A per-second rate ("requests/sec", "tokens/sec"), whatever time unit it is in."""
    metric = data.get(tag)
    if not isinstance(metric, dict):
        return None
    per = str(metric.get("unit", "")).rpartition("/")[2]
    return float(metric["avg"]) / _seconds_per(per, tag)


def _latency(data: dict[str, Any], tag: str) -> dict[str, Any]:
    """One latency distribution in ms, in the shape of metrics.stats()."""
    metric = data.get(tag)
    if not isinstance(metric, dict):
        return {"count": 0, "mean": None}
    scale = _seconds_per(str(metric.get("unit")), tag) * 1e3
    out: dict[str, Any] = {"count": int(metric.get("count", 0)), "mean": metric["avg"] * scale}
    for key, value in metric.items():
        if (key[:1] == "p" and key[1:].replace(".", "", 1).isdigit()) or key in _STATS:
            out[key] = value * scale
    return out


def _slo(config: dict[str, Any]) -> dict[str, float]:
    slos = config.get("slos") or {}
    return {_SLO_NAMES.get(tag, tag): float(limit) for tag, limit in slos.items()}


def summary_from_aiperf(data: dict[str, Any]) -> dict[str, Any]:
    """An aiperf profile_export_aiperf.json object as our summary (what `bench compare`
    shows); see the module docstring for the definitions."""
    completed, failed = _count(data, "request_count"), _count(data, "error_request_count")
    duration = data["benchmark_duration"]
    config = data.get("input_config") or {}
    summary: dict[str, Any] = {
        "num_requests": completed + failed,
        "completed": completed,
        "failed": failed,
        "cancelled": 0,
        "duration_s": float(duration["avg"]) * _seconds_per(str(duration.get("unit")),
                                                            "benchmark_duration"),
        "total_prompt_tokens": _count(data, "total_isl"),
        "total_output_tokens": _count(data, "total_osl"),
        "prompt_tokens_reported": bool(config.get("endpoint", {}).get("use_server_token_count")),
        "request_throughput": _rate(data, "request_throughput") or 0.0,
        "output_throughput": _rate(data, "output_token_throughput") or 0.0,
        "total_token_throughput": _rate(data, "total_token_throughput") or 0.0,
        "goodput": _rate(data, "goodput"),
        "slo": _slo(config),
    }
    for ours, tag in _LATENCIES:
        summary[ours] = _latency(data, tag)
    return summary


def label(data: dict[str, Any]) -> str:
    """"aiperf <model>" (the first model name of the run)."""
    models = ((data.get("input_config") or {}).get("models") or {}).get("items") or [{}]
    return f"aiperf {models[0].get('name', '')}".strip()
