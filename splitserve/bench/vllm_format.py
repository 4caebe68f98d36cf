"""Results in the flat format of `vllm bench serve` (its --save-result JSON), both ways.

Writing: `bench serve --result-format vllm` turns one run into vLLM's keys, computed from the
same request records with vLLM's definitions (TPOT per request excluding the first token,
ITL per gap, E2EL per request; `std_*` is the population standard deviation, `median_*`
the 50th percentile, `pNN_*` by linear interpolation between order statistics like
numpy's). Reading: `bench compare` accepts such files (from vLLM or from us) and turns them
into our summary shape, so either tool's results sit side by side.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

from splitserve.bench.metrics import RequestRecord, percentile

# Our latency name -> vLLM's infix.
_METRICS = (("ttft_ms", "ttft"), ("tpot_ms", "tpot"), ("itl_ms", "itl"), ("e2e_ms", "e2el"))
_REQUIRED = ("duration", "completed", "total_input_tokens", "total_output_tokens",
             "mean_ttft_ms")


def _latencies(records: list[RequestRecord]) -> dict[str, list[float]]:
    done = [r for r in records if r.ok]
    return {
        "ttft_ms": [v for r in done if (v := r.ttft_ms) is not None],
        "tpot_ms": [v for r in done if (v := r.tpot_ms) is not None],
        "itl_ms": [g for r in done for g in r.itl_ms()],
        "e2e_ms": [v for r in done if (v := r.e2e_ms) is not None],
    }


def to_vllm(summary: dict[str, Any], records: list[RequestRecord], *, request_rate: float,
            max_concurrency: int | None, model_id: str | None,
            percentiles: tuple[float, ...]) -> dict[str, Any]:
    """One run in vLLM's flat result keys."""
    out: dict[str, Any] = {
        "date": time.strftime("%Y%m%d-%H%M%S"),
        "backend": "splitserve-bench",
        "model_id": model_id,
        "num_prompts": summary["num_requests"],
        "request_rate": "inf" if math.isinf(request_rate) else request_rate,
        "max_concurrency": max_concurrency,
        "duration": summary["duration_s"],
        "completed": summary["completed"],
        "failed": summary["num_requests"] - summary["completed"],
        "total_input_tokens": summary["total_prompt_tokens"],
        "total_output_tokens": summary["total_output_tokens"],
        "request_throughput": summary["request_throughput"],
        "output_throughput": summary["output_throughput"],
        "total_token_throughput": summary["total_token_throughput"],
    }
    if summary.get("slo"):
        out["request_goodput"] = summary["goodput"]
    for ours, theirs in _METRICS:
        values = _latencies(records)[ours]
        out[f"mean_{theirs}_ms"] = statistics.fmean(values) if values else 0.0
        out[f"median_{theirs}_ms"] = percentile(values, 50) if values else 0.0
        out[f"std_{theirs}_ms"] = statistics.pstdev(values) if values else 0.0
        for p in percentiles:
            out[f"p{p:g}_{theirs}_ms"] = percentile(values, p) if values else 0.0
    return out


def is_vllm_result(data: Any) -> bool:
    return isinstance(data, dict) and all(key in data for key in _REQUIRED)


def summary_from_vllm(data: dict[str, Any]) -> dict[str, Any]:
    """A vLLM results dict as our summary (the fields `bench compare` shows)."""
    completed = int(data["completed"])
    summary: dict[str, Any] = {
        "num_requests": int(data.get("num_prompts", completed)),
        "completed": completed,
        "failed": int(data.get("failed", int(data.get("num_prompts", completed)) - completed)),
        "cancelled": 0,
        "duration_s": float(data["duration"]),
        "total_prompt_tokens": int(data["total_input_tokens"]),
        "total_output_tokens": int(data["total_output_tokens"]),
        "request_throughput": float(data.get("request_throughput", 0.0)),
        "output_throughput": float(data.get("output_throughput", 0.0)),
        "total_token_throughput": float(data.get("total_token_throughput", 0.0)),
        "goodput": data.get("request_goodput"),
        "slo": {},
    }
    for ours, theirs in _METRICS:
        entry: dict[str, Any] = {"mean": data.get(f"mean_{theirs}_ms")}
        if f"median_{theirs}_ms" in data:
            entry["p50"] = data[f"median_{theirs}_ms"]
        prefix, suffix = "p", f"_{theirs}_ms"
        for key, value in data.items():
            if key.startswith(prefix) and key.endswith(suffix):
                entry[key[: -len(suffix)]] = value
        summary[ours] = entry
    return summary
