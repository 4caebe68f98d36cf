"""PNG plots (matplotlib, Agg backend) for `splitserve bench serve` and `compare`.

- <metric>_cdf.png for TTFT, TPOT, ITL and E2E: one empirical CDF per series (a run, a
  rate of a sweep, or a results file being compared);
- timeline.png: output tokens/s and requests in flight over the run;
- sweep_goodput.png, sweep_latency.png: goodput / throughput and p99 TTFT / TPOT against
  the offered request rate (an infinite rate is left off the x axis).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from splitserve.bench.metrics import RequestRecord

_CDF_METRICS = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E"))


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _values(records: list[RequestRecord], metric: str) -> list[float]:
    done = [r for r in records if r.ok]
    if metric == "itl_ms":
        return sorted(g for r in done for g in r.itl_ms())
    return sorted(v for r in done if (v := getattr(r, metric)) is not None)


def plot_cdfs(series: dict[str, list[RequestRecord]], out_dir: str | Path) -> list[Path]:
    """One CDF figure per latency metric, a line per series; returns the files written."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for metric, name in _CDF_METRICS:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, records in series.items():
            values = _values(records, metric)
            if values:
                ys = [(i + 1) / len(values) for i in range(len(values))]
                ax.step(values, ys, where="post", label=f"{label} (n={len(values)})")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests" if metric != "itl_ms" else "fraction of gaps")
        ax.set_ylim(0, 1.01)
        ax.grid(alpha=0.3)
        ax.set_title(f"{name} CDF")
        if series:
            ax.legend(fontsize=7, loc="lower right")
        path = out / f"{metric.removesuffix('_ms')}_cdf.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def plot_timeline(records: list[RequestRecord], out_dir: str | Path,
                  num_bins: int = 60) -> Path:
    """Output tokens/s (binned chunk arrivals) and requests in flight over the run."""
    plt = _pyplot()
    end = max([r.end_s for r in records if r.end_s is not None] + [1e-3])
    width = end / num_bins
    tokens = [0.0] * num_bins
    for r in records:
        for t, k in zip(r.chunk_s, r.chunk_tokens, strict=True):
            tokens[min(int(t / width), num_bins - 1)] += k / width
    edges = [i * width for i in range(num_bins)]
    in_flight = [sum(1 for r in records if r.send_s is not None and r.send_s <= t
                     and (r.end_s is None or r.end_s > t)) for t in edges]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(edges, tokens, drawstyle="steps-post", label="output tokens/s")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("output tokens/s")
    ax2 = ax.twinx()
    ax2.plot(edges, in_flight, color="tab:orange", alpha=0.7, drawstyle="steps-post",
             label="in flight")
    ax2.set_ylabel("requests in flight")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper left", fontsize=7)
    ax.grid(alpha=0.3)
    path = Path(out_dir) / "timeline.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_sweep(rates: list[float], summaries: list[dict[str, Any]], out_dir: str | Path
               ) -> list[Path]:
    """Goodput and latency percentiles against the offered rate."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    points = [(r, s) for r, s in zip(rates, summaries, strict=True) if not math.isinf(r)]
    xs = [r for r, _ in points]

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [s["goodput"] for _, s in points], "o-", label="goodput")
    ax.plot(xs, [s["request_throughput"] for _, s in points], "s--", label="throughput")
    ax.plot(xs, xs, ":", color="gray", label="offered")
    ax.set_xlabel("offered request rate (req/s)")
    ax.set_ylabel("req/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    goodput_path = out / "sweep_goodput.png"
    fig.tight_layout()
    fig.savefig(goodput_path, dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (metric, name) in zip(axes, (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT")), strict=True):
        for pct, style in (("p50", "o--"), ("p99", "o-")):
            ys = [s[metric].get(pct) for _, s in points]
            ax.plot(xs, [math.nan if y is None else y for y in ys], style,
                    label=f"{name} {pct}")
        ax.set_xlabel("offered request rate (req/s)")
        ax.set_ylabel(f"{name} (ms)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    latency_path = out / "sweep_latency.png"
    fig.tight_layout()
    fig.savefig(latency_path, dpi=100)
    plt.close(fig)
    return [goodput_path, latency_path]
