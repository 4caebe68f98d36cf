"""Tables for the terminal and the results JSON of `splitserve bench serve`.

Results file (--out), version 1:
    {"kind": "splitserve.bench.serve/run", "version": 1, "label": str, "config": {...},
     "summary": {...metrics.summarize()...}, "by_tag": {tag: summary},
     "requests": [RequestRecord fields, times in s since the run's start]}
A sweep (--sweep-rates) writes {"kind": "splitserve.bench.serve/sweep", "version": 1,
"label", "config", "runs": [run objects as above, each with "request_rate"]}.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from splitserve.bench import aiperf_format, vllm_format
from splitserve.bench.metrics import RequestRecord

RUN_KIND = "splitserve.bench.serve/run"
SWEEP_KIND = "splitserve.bench.serve/sweep"
VERSION = 1
LATENCIES = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E"))
_SCALARS = (
    ("completed", "completed requests"), ("failed", "failed requests"),
    ("cancelled", "cancelled requests"), ("duration_s", "duration (s)"),
    ("request_throughput", "request throughput (req/s)"),
    ("output_throughput", "output token throughput (tok/s)"),
    ("total_token_throughput", "total token throughput (tok/s)"),
    ("goodput", "goodput (req/s)"),
)


def _num(value: Any, width: int = 10) -> str:
    if value is None:
        return "-".rjust(width)
    if isinstance(value, float) and math.isinf(value):
        return "inf".rjust(width)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value).rjust(width)
    return f"{value:{width}.2f}"


def slo_text(slo: dict[str, float]) -> str:
    if not slo:
        return "no --slo: every completed request counts"
    return ", ".join(f"{k} <= {v:g}" for k, v in slo.items())


def format_summary(summary: dict[str, Any], title: str = "",
                   by_tag: dict[str, dict[str, Any]] | None = None) -> str:
    """The end-of-run table: counts, throughputs, goodput, latency percentiles."""
    pcts = [k for k in summary["ttft_ms"] if k.startswith("p")]
    lines = [f"{' ' + title + ' ' if title else ''}".center(66, "=")]
    lines.append(f"requests: {summary['completed']} completed, {summary['failed']} failed, "
                 f"{summary['cancelled']} cancelled (of {summary['num_requests']} sent)")
    if summary.get("connection_retries"):
        lines.append(f"resent on a fresh connection (pooled one closed before any response): "
                     f"{summary['connection_retries']}")
    for key, name in _SCALARS[3:]:
        lines.append(f"{name:<40s}{_num(summary[key], 12)}")
    lines.append(f"  goodput: {summary['good_requests']} requests met "
                 f"[{slo_text(summary['slo'])}]")
    tokens = "" if summary.get("prompt_tokens_reported", True) else " (prompt: estimated)"
    lines.append(f"tokens: {summary['total_prompt_tokens']} prompt, "
                 f"{summary['total_output_tokens']} output{tokens}")
    lines.append("-" * 66)
    lines.append(f"{'latency (ms)':<14s}" + "".join(f"{h:>10s}" for h in ["mean", *pcts])
                 + f"{'n':>8s}")
    for key, name in LATENCIES:
        s = summary[key]
        lines.append(f"{name:<14s}" + "".join(_num(s[k]) for k in ["mean", *pcts])
                     + f"{s['count']:>8d}")
    lag = summary.get("send_lag_ms") or {}
    if lag.get("max") is not None:
        lines.append(f"{'send lag':<14s}"
                     + "".join(_num(lag[k]) for k in ["mean", *pcts]) + f"{lag['count']:>8d}")
    failed = summary.get("failed_e2e_ms") or {}
    if failed.get("max") is not None:
        lines.append(f"{'failed after':<14s}"
                     + "".join(_num(failed[k]) for k in ["mean", *pcts]) + f"{failed['count']:>8d}")
    if by_tag:
        lines.append("-" * 66)
        lines.append(f"{'by tag':<14s}{'n':>6s}{'TTFT p50':>11s}{'TTFT p99':>11s}"
                     f"{'TPOT p50':>11s}{'TPOT p99':>11s}")
        for tag, s in by_tag.items():
            lines.append(f"{tag or '-':<14s}{s['completed']:>6d}"
                         f"{_num(s['ttft_ms'].get('p50'), 11)}"
                         f"{_num(s['ttft_ms'].get('p99'), 11)}"
                         f"{_num(s['tpot_ms'].get('p50'), 11)}"
                         f"{_num(s['tpot_ms'].get('p99'), 11)}")
    if summary.get("errors"):
        lines.append("-" * 66)
        lines += [f"error x{n}: {msg[:100]}" for msg, n in summary["errors"].items()]
    lines.append("=" * 66)
    return "\n".join(lines)


SWEEP_COLUMNS = (
    ("rate", "req rate"), ("completed", "ok"), ("failed", "err"),
    ("request_throughput", "req/s"), ("output_throughput", "out tok/s"),
    ("goodput", "goodput"), ("ttft_ms.p50", "TTFT p50"), ("ttft_ms.p99", "TTFT p99"),
    ("tpot_ms.p50", "TPOT p50"), ("tpot_ms.p99", "TPOT p99"), ("itl_ms.p99", "ITL p99"),
    ("e2e_ms.p99", "E2E p99"),
)


def lookup(summary: dict[str, Any], dotted: str) -> Any:
    value: Any = summary
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def sweep_header() -> str:
    return "".join(f"{name:>10s}" for _, name in SWEEP_COLUMNS)


def sweep_row(rate: float, summary: dict[str, Any]) -> str:
    values = {"rate": rate}
    return "".join(_num(values[k] if k in values else lookup(summary, k))
                   for k, _ in SWEEP_COLUMNS)


def flat_metrics(summary: dict[str, Any]) -> list[tuple[str, Any]]:
    """(name, value) rows of a summary, for side-by-side comparison."""
    rows = [(name, summary.get(key)) for key, name in _SCALARS]
    pcts = [k for k in summary["ttft_ms"] if k.startswith("p") or k == "mean"]
    for key, name in LATENCIES:
        rows += [(f"{name} {p} (ms)", summary[key].get(p)) for p in pcts]
    return rows


# ---------------------------------------------------------------- JSON


def run_json(label: str, config: dict[str, Any], summary: dict[str, Any],
             by_tag: dict[str, Any], records: list[RequestRecord],
             **extra: Any) -> dict[str, Any]:
    return {"kind": RUN_KIND, "version": VERSION, "label": label, "config": config,
            **extra, "summary": summary, "by_tag": by_tag,
            "requests": [dataclasses.asdict(r) for r in records]}


def sweep_json(label: str, config: dict[str, Any], runs: list[dict[str, Any]]
               ) -> dict[str, Any]:
    return {"kind": SWEEP_KIND, "version": VERSION, "label": label, "config": config,
            "runs": runs}


def save(path: str | Path, data: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # inf (an unbounded rate) is written as the string "inf": strict JSON readers choke on
    # the bare Infinity that json.dumps would emit.
    Path(path).write_text(json.dumps(_encode(data), indent=1) + "\n", encoding="utf-8")


def _encode(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def load(path: str | Path) -> dict[str, Any]:
    """A results file, with "requests" revived as RequestRecord objects. A `vllm bench serve`
    results file (or ours in its format) or aiperf's profile_export_aiperf.json loads as a
    run without per-request records."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if vllm_format.is_vllm_result(data):
        label = data.get("label") or f"{data.get('backend', 'vllm')} {data.get('model_id', '')}"
        return _foreign_run(label.strip(), vllm_format.summary_from_vllm(data))
    if aiperf_format.is_aiperf_result(data):
        return _foreign_run(aiperf_format.label(data), aiperf_format.summary_from_aiperf(data))
    if not isinstance(data, dict) or data.get("kind") not in (RUN_KIND, SWEEP_KIND) or data.get("version") != VERSION:
        raise ValueError(f"{path}: not a results file of `splitserve bench serve` (version "
                         f"{VERSION}), `vllm bench serve` or aiperf (profile_export_aiperf.json)")
    for run in [data] if data["kind"] == RUN_KIND else data["runs"]:
        run["requests"] = [RequestRecord(**r) for r in run["requests"]]
        if "request_rate" in run:
            run["request_rate"] = float(run["request_rate"])
    return data


def _foreign_run(label: str, summary: dict[str, Any]) -> dict[str, Any]:
    """Another tool's aggregate results as a run of ours, without per-request records."""
    return {"kind": RUN_KIND, "version": VERSION, "label": label, "config": {},
            "summary": summary, "by_tag": {}, "requests": []}
