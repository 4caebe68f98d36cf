"""The disaggregation experiment (DistServe's question, on this machine).

    splitserve bench disagg [--model smollm2-135m] [--rates 0.25,0.5,1,1.5] [--num-requests 40]
                            [--slo tpot_ms=120,ttft_ms=3000] [--out-dir results/disagg]
                            [--route-policy load|latency]

The same cores, two ways, behind the same router, one CPU thread per worker:
  disaggregated: 1 prefill worker + 1 decode worker (every prompt prefilled remotely)
  colocated:     2 decode workers that prefill their own prompts (2 colocated replicas)
Each gets the same seeded Poisson sweep of a mixed workload (mostly short prompts, some
long ones) through `splitserve bench serve`; results, plots and the comparison land in
--out-dir. `--route-policy latency` runs the router's latency-aware routing (each request to
the worker, or P/D pair, with the best predicted TTFT) instead of routing by load.
`--speed-probe-s S` measures the host's speed before every run and after the last (sim.probe:
batch-1 decode steps for S seconds in an engine of the workers' model, dtype and one thread,
in a process of its own, while no request is in flight); each run records them under
"host_probe", and `bench simulate` runs that rate at the speed they saw.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

from splitserve.bench import compare, serve
from splitserve.bench.procs import local_deployment
from splitserve.sim.probe import SpeedProbe

CONFIGS = {
    "colocated": {"num_prefill": 0, "num_decode": 2, "local_prefill_threshold": 10**9},
    "disaggregated": {"num_prefill": 1, "num_decode": 1, "local_prefill_threshold": 0},
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="splitserve bench disagg")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rates", default="0.25,0.5,1,1.5")
    ap.add_argument("--num-requests", type=int, default=40)
    ap.add_argument("--slo", default="tpot_ms=120,ttft_ms=3000")
    ap.add_argument("--out-dir", default="results/disagg")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=list(CONFIGS), default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--route-policy", default="load", choices=["load", "latency"],
                    help="the router's --route-policy")
    ap.add_argument("--workload-args", default="--long-input-len 1000 --long-fraction 0.2 "
                    "--input-len 64 --output-len 96",
                    help="extra `bench serve` workload flags (one string)")
    ap.add_argument("--speed-probe-s", type=float, default=0.0,
                    help="seconds of speed probe before every run and after the last "
                         "(0: none)")
    args = ap.parse_args(argv)
    if args.speed_probe_s < 0:
        ap.error(f"--speed-probe-s must be >= 0, got {args.speed_probe_s}")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        probe_host = None
        if args.speed_probe_s:
            probe = stack.enter_context(SpeedProbe(args.model, args.dtype, threads=1))

            def probe_host() -> dict[str, Any]:
                return {"speed_probe_ms": probe.measure(args.speed_probe_s),
                        "model": args.model, "dtype": args.dtype, "threads": 1}

        files = _sweep_configs(args, out_dir, probe_host)
    if len(files) == 2:
        compare.main([*files, "--plot-dir", str(out_dir / "compare")])
        print(f"sweep plot: {plot_sweeps(files, out_dir / 'sweep.png')}")
    return 0


def _sweep_configs(args: argparse.Namespace, out_dir: Path,
                   probe_host: serve.HostProbe | None) -> list[str]:
    """`bench serve`'s sweep of every configuration (or --only's), in turn: their files."""
    files = []
    for name, config in CONFIGS.items():
        if args.only and name != args.only:
            continue
        print(f"=== {name}: {config}", flush=True)
        worker_args = ("--no-prefix-caching", "--num-kv-blocks", "512", "--dtype", args.dtype)
        with local_deployment(args.model, threads=1, worker_args=worker_args,
                              router_args=("--route-policy", args.route_policy),
                              **config) as addrs:  # type: ignore[arg-type]
            result = out_dir / f"{name}.json"
            code = serve.main([
                "--target", f"grpc://{addrs['router']}", "--label", name,
                "--workload", "mixed", *args.workload_args.split(),
                "--sweep-rates", args.rates, "--num-requests", str(args.num_requests),
                "--seed", str(args.seed), "--slo", args.slo, "--out", str(result),
                "--plot-dir", str(out_dir / name), "--no-progress", "--warmup", "2",
            ], probe_host=probe_host)
            if code != 0:
                print(f"{name}: bench serve exited {code}")
            files.append(str(result))
    return files


def plot_sweeps(files: list[str], out: Path) -> Path:
    """Goodput, TPOT and TTFT against request rate, one line per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from splitserve.bench import report

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for path in files:
        data = report.load(path)
        runs = [r for r in data["runs"] if isinstance(r["request_rate"], (int, float))]
        rates = [r["request_rate"] for r in runs]
        summaries = [r["summary"] for r in runs]
        label = data["label"]
        axes[0].plot(rates, [s["goodput"] for s in summaries], "o-", label=label)
        for q, style in (("p50", "o-"), ("p99", "s--")):
            axes[1].plot(rates, [s["tpot_ms"][q] for s in summaries], style, label=f"{label} {q}")
            axes[2].plot(rates, [s["ttft_ms"][q] for s in summaries], style, label=f"{label} {q}")
    slo = report.load(files[0])["config"].get("slo") or {}
    titles = (f"goodput (req/s) at {slo}", "TPOT (ms)", "TTFT (ms)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xlabel("offered request rate (req/s)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
