"""The targets `splitserve bench fuzz` judges its figures on, and its printed report.

Figures are the dict fuzz._run returns (plus "tracebacks" and "traceback_excerpts" read
from the logs, and "targets" / "passed" from here); a target is a row {"target",
"measured", "goal", "pass"}.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from splitserve.bench.fuzz_clients import GOOD_CODES
from splitserve.bench.fuzz_service import WORKERS

BATCH = 1000  # fuzz cases between two normal requests
MiB = 2**20
NORMAL_WITHIN_S = 1.0
RSS_RATIO_MAX = 1.10
BIG_REPLY_WITHIN_S = 0.1
BIG_RSS_GROWTH_MAX = 50 * MiB


def http_failed(status: str) -> bool:
    """A 5xx, or no response at all."""
    return not status.isdigit() or int(status) >= 500


def grpc_failed(status: str) -> bool:
    return status not in GOOD_CODES


def targets(figures: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per target: what was measured, the goal, and whether it was met."""
    rows: list[dict[str, Any]] = []

    def add(name: str, measured: str, goal: str, ok: bool) -> None:
        rows.append({"target": name, "measured": measured, "goal": goal, "pass": bool(ok)})

    if args.http_cases:
        statuses = figures["http"]["statuses"]
        errors = sum(n for s, n in statuses.items() if s.isdigit() and int(s) >= 500)
        dropped = sum(n for s, n in statuses.items() if not s.isdigit())
        add("HTTP cases: 5xx responses", str(errors), "0", errors == 0)
        add("HTTP cases: no response", str(dropped), "0", dropped == 0)
    if args.grpc_cases:
        ran = "grpc" in figures
        bad = {s: n for s, n in figures.get("grpc", {}).get("statuses", {}).items()
               if grpc_failed(s)}
        measured = (json.dumps(bad) if bad else "0") if ran else "not run"
        add("gRPC cases: failing statuses", measured, "0 (INTERNAL, UNKNOWN, ... fail)",
            ran and not bad)
    exited = figures["exited"]
    add("processes exited", ", ".join(f"{k} ({v})" for k, v in exited.items()) or "none",
        "none", not exited)
    tracebacks = sum(figures["tracebacks"].values())
    add("tracebacks in the logs", str(tracebacks), "0", tracebacks == 0)
    start, end = figures.get("rss_start_bytes"), figures.get("rss_end_bytes")
    if start and end:
        add("router RSS end/start", f"{end / start:.3f} ({start / MiB:.0f} -> "
            f"{end / MiB:.0f} MiB)", f"<= {RSS_RATIO_MAX:.2f}", end / start <= RSS_RATIO_MAX)
    else:
        add("router RSS end/start", "not measured", f"<= {RSS_RATIO_MAX:.2f}", False)
    probes = figures["probes"]
    if probes:
        served = [p for p in probes if p["status"] in ("200", "OK")]
        slowest = max(p["seconds"] for p in probes)
        add(f"normal request after each {BATCH:,} cases",
            f"{len(served)}/{len(probes)} served, slowest {slowest:.3f} s",
            f"all within {NORMAL_WITHIN_S:g} s",
            len(served) == len(probes) and slowest <= NORMAL_WITHIN_S)
    if args.big_bodies:
        _big_body_targets(figures.get("big_bodies"), args, add)
    return rows


def _big_body_targets(big: dict[str, Any] | None, args: argparse.Namespace,
                      add: Callable[[str, str, str, bool], None]) -> None:
    name = f"{args.big_bodies} x {args.big_body_mb:g} MiB bodies at once"
    if big is None:
        for what in ("413", "router RSS growth", "workers registered"):
            add(f"{name}: {what}", "not run", "", False)
        return
    posts = big["posts"]
    times = [p["seconds"] for p in posts if p["status"] == 413]
    slowest = f", slowest {1000 * max(times):.0f} ms" if times else ""
    add(f"{name}: 413", f"{len(times)}/{len(posts)} got 413{slowest}",
        f"each within {1000 * BIG_REPLY_WITHIN_S:.0f} ms",
        len(times) == len(posts) and max(times, default=0) <= BIG_REPLY_WITHIN_S)
    growth = big["rss_peak_bytes"] - big["rss_before_bytes"]
    add(f"{name}: router RSS growth", f"{growth / MiB:.1f} MiB at peak",
        f"< {BIG_RSS_GROWTH_MAX // MiB} MiB", growth < BIG_RSS_GROWTH_MAX)
    live, trouble = big["live_workers"], big["heartbeat_trouble"]
    add(f"{name}: workers registered", f"{','.join(live) or 'none'}; {trouble} heartbeat "
        "warnings", f"{','.join(WORKERS)}; 0", set(WORKERS) <= set(live) and trouble == 0)


def format_report(figures: dict[str, Any], asked: dict[str, int]) -> str:
    """Cases sent and replies by phase, the targets table, failing cases, tracebacks."""
    lines = []
    for phase in ("http", "grpc"):
        if phase in figures:
            sent, statuses = figures[phase]["sent"], figures[phase]["statuses"]
            lines.append(f"{phase} cases sent: {sum(sent.values())} of {asked[phase]} "
                         f"({', '.join(f'{k} {n}' for k, n in sorted(sent.items()))}); "
                         f"replies: {json.dumps(dict(sorted(statuses.items())))}")
    rows = [("target", "measured", "goal", "result")] + [
        (r["target"], r["measured"], r["goal"], "PASS" if r["pass"] else "FAIL")
        for r in figures["targets"]]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        cells = (cell.ljust(w) for cell, w in zip(row, [*widths, 0], strict=True))
        lines.append("  ".join(cells).rstrip())
    for phase in ("http", "grpc"):
        for failure in figures.get(phase, {}).get("failures", []):
            lines.append(f"  {phase} failure: {failure}")
    lines.extend(figures["traceback_excerpts"])
    lines.append("PASS" if figures["passed"] else "FAIL")
    return "\n".join(lines)
