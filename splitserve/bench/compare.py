"""`splitserve bench compare BASE.json OTHER.json [...]`: results side by side.

For single runs: every summary metric of each file, with each other file's difference and
ratio against the first (the baseline). For sweeps: the same per request rate present in
every file. --plot-dir overlays the files' latency CDFs (one line per file). A file may also
be `vllm bench serve`'s --save-result JSON or aiperf's profile_export_aiperf.json, read as
they are (vllm_format.py, aiperf_format.py: how their metrics map onto ours).

    splitserve bench compare vllm.json splitserve.json --plot-dir cmp/
    splitserve bench compare ours.json artifacts/profile_export_aiperf.json
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from splitserve.bench import plots, report


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.2f}"


def _diff(base: Any, other: Any) -> tuple[str, str]:
    if not isinstance(base, (int, float)) or not isinstance(other, (int, float)):
        return "-", "-"
    diff = other - base
    ratio = "-" if base == 0 else f"{other / base:.2f}x"
    sign = "+" if diff >= 0 else ""
    return (f"{sign}{diff}" if isinstance(diff, int) else f"{sign}{diff:.2f}"), ratio


def compare_summaries(labels: list[str], summaries: list[dict[str, Any]]) -> str:
    """A table: metric, then per file its value, and for files after the first the
    difference and ratio against the first. Files are columns A, B, ... (legend on top)."""
    names = [chr(ord("A") + i) for i in range(len(labels))]
    lines = [f"{n} = {label}" for n, label in zip(names, labels, strict=True)]
    header = [f"{'metric':<32s}", f"{names[0]:>12s}"]
    for n in names[1:]:
        header += [f"{n:>12s}", f"{n + '-' + names[0]:>12s}", f"{n + '/' + names[0]:>8s}"]
    lines.append("".join(header))
    columns = [dict(report.flat_metrics(s)) for s in summaries]
    for name, base in report.flat_metrics(summaries[0]):
        row = [f"{name:<32s}", f"{_fmt(base):>12s}"]
        for other in columns[1:]:
            value = other.get(name)
            diff, ratio = _diff(base, value)
            row += [f"{_fmt(value):>12s}", f"{diff:>12s}", f"{ratio:>8s}"]
        lines.append("".join(row))
    slos = {report.slo_text(s["slo"]) for s in summaries}
    if len(slos) > 1:
        lines.append("warning: the files' SLOs differ, so their goodput is not comparable")
    return "\n".join(lines)


def _labels(files: list[str], data: list[dict[str, Any]]) -> list[str]:
    labels = [d.get("label") or f for f, d in zip(files, data, strict=True)]
    if len(set(labels)) < len(labels):  # same target twice: tell them apart by file
        labels = files
    return labels


def compare(files: list[str], plot_dir: str | None = None) -> str:
    data = [report.load(f) for f in files]
    labels = _labels(files, data)
    kinds = {d["kind"] for d in data}
    if len(kinds) > 1:
        raise ValueError("cannot compare a single run with a sweep")
    if kinds == {report.RUN_KIND}:
        text = compare_summaries(labels, [d["summary"] for d in data])
        if plot_dir and not all(d["requests"] for d in data):
            text += "\nno plots: a file without per-request records (vLLM's or aiperf's)"
        elif plot_dir:
            plots.plot_cdfs({lb: d["requests"] for lb, d in zip(labels, data, strict=True)}, plot_dir)
        return text
    by_rate = [{run["request_rate"]: run for run in d["runs"]} for d in data]
    rates = [r for r in by_rate[0] if all(r in other for other in by_rate[1:])]
    if not rates:
        raise ValueError("the sweeps share no request rate")
    sections = []
    for rate in rates:
        title = "inf" if math.isinf(rate) else f"{rate:g}"
        sections.append(f"== request rate {title} req/s ==")
        sections.append(compare_summaries(labels, [runs[rate]["summary"] for runs in by_rate]))
        if plot_dir:
            plots.plot_cdfs({lb: runs[rate]["requests"] for lb, runs in zip(labels, by_rate, strict=True)},
                            f"{plot_dir}/rate-{title}")
    return "\n".join(sections)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="splitserve bench compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="results JSON of `bench serve --out`, `vllm "
                    "bench serve` or aiperf (first: the baseline)")
    ap.add_argument("--plot-dir", help="write overlaid latency CDFs here")
    ns = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if len(ns.files) < 2:
        ap.error("give at least two results files")
    try:
        print(compare(ns.files, ns.plot_dir))
    except (OSError, ValueError, KeyError) as err:
        print(f"splitserve bench compare: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
