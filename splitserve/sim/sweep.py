"""`splitserve bench simulate`: a `bench disagg` sweep in the simulator, beside the measured one.

    splitserve bench simulate --profile P.json [--rates 0.5,1,1.5,2] [--num-requests 30]
                              [--slo tpot_ms=90,ttft_ms=5000] [--seed 0]
                              [--workload-args "..."] [--measured-dir results/disagg]
                              [--replicates N] [--speed-sigma S] [--speed-period-s T]

The same deployments as `bench disagg` (bench/disagg.py's CONFIGS: 2 colocated replicas, and
1 prefill + 1 decode worker), the same seeded workload and arrivals (bench/workloads.py,
bench/arrivals.py, parsed from the same `bench serve` flags) and the same metrics
(bench/metrics.summarize). With --measured-dir (a `bench disagg --out-dir`, holding
colocated.json and disaggregated.json) every predicted figure is printed beside the
measured one with the relative error; rates default to the measured ones.

Replicates: where the profile measured the host's speed drift (sim.speed; or with
--speed-sigma), each rate is simulated --replicates times (default 21), each run under its
own drift (seeds 0..N-1), and a figure is the median over the runs, printed with the band
from their 10th to their 90th percentile: a tail over 30 requests turns on a few routing
ties, which one deterministic run decides one way. Without a drift: one deterministic run.

Speed level: where the measured sweep probed the host between its runs (`bench disagg
--speed-probe-s`) and the profile holds the same probe's median (speed_probe_ms), each rate
runs at the level the probes around its run saw, relative to the profile's (the geometric
mean of the probe before it and the one after, over the profile's): every decode step's
compute is multiplied by it, on top of the drift (the steps with prompt tokens keep the
profile's speed: sim.speed says why). The profile's step times hold the speed of the
minutes it was taken in; the sweep may run 20% faster or slower (BENCHMARKS.md, sixteenth
session). `--no-speed-level` ignores the probes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path
from typing import Any

from splitserve.bench import disagg, report, serve
from splitserve.bench.arrivals import arrival_offsets
from splitserve.bench.metrics import parse_slo, summarize
from splitserve.bench.workloads import WorkloadConfig, make_workload
from splitserve.sim.cluster import Deployment, SimRequest, simulate
from splitserve.sim.profile import Profile, ProfiledStepTimes
from splitserve.sim.speed import HostSpeed

DEFAULT_WORKLOAD_ARGS = "--long-input-len 1000 --long-fraction 0.2 --input-len 64 --output-len 96"
# (summary key, statistic) pairs compared per rate
FIGURES = (("goodput", None), ("ttft_ms", "p50"), ("ttft_ms", "p99"), ("tpot_ms", "p50"),
           ("tpot_ms", "p99"))


def deployment_of(config_name: str, base: Deployment | None = None) -> Deployment:
    """bench disagg's named configuration as a simulated Deployment (its workers share
    one machine's cores: the profile's co-run factors apply)."""
    c = disagg.CONFIGS[config_name]
    base = base or Deployment()
    return Deployment(num_prefill=c["num_prefill"], num_decode=c["num_decode"],
                      local_prefill_threshold=c["local_prefill_threshold"],
                      block_size=base.block_size, num_kv_blocks=base.num_kv_blocks,
                      max_num_seqs=base.max_num_seqs,
                      max_num_batched_tokens=base.max_num_batched_tokens,
                      prefill_policy=base.prefill_policy, shared_host=True)


def parse_workload(workload_args: str, seed: int, kind: str = "mixed") -> WorkloadConfig:
    """The WorkloadConfig `bench serve` builds from these flags (its own parser)."""
    args, _ = serve.parse_args(["--target", "grpc://sim:0", "--workload", kind,
                                *workload_args.split(), "--seed", str(seed)])
    return args.workload


def make_trace(workload: WorkloadConfig, rate: float, num_requests: int,
               burstiness: float = 1.0) -> list[SimRequest]:
    """The first `num_requests` requests of the workload at the bench's arrival times."""
    pairs = zip(make_workload(workload), arrival_offsets(rate, burstiness, workload.seed),
                strict=False)
    return [SimRequest(i, due, r.prompt_len, r.max_tokens, r.tag)
            for i, (r, due) in enumerate(itertools.islice(pairs, num_requests))]


DEFAULT_REPLICATES = 21  # with a speed drift


def simulate_summary(deployment: Deployment, model: ProfiledStepTimes, trace: list[SimRequest],
                     slo: dict[str, float], speed: HostSpeed | None = None) -> dict[str, Any]:
    return summarize(simulate(deployment, model, trace, speed), slo)


def replicate_summaries(deployment: Deployment, model: ProfiledStepTimes,
                        trace: list[SimRequest], slo: dict[str, float], replicates: int,
                        sigma: float, period_s: float, level: float = 1.0
                        ) -> list[dict[str, Any]]:
    """One summary per run: `replicates` runs under drifts of seeds 0.. (sigma > 0), or
    the one deterministic run; every decode step at the speed `level` besides."""
    if replicates < 1:
        raise ValueError(f"replicates must be >= 1, got {replicates}")
    if replicates > 1 and sigma <= 0:
        raise ValueError("replicates differ only under a speed drift: the profile has none "
                         "measured (speed_sigma 0); give --speed-sigma")
    if replicates == 1:
        speed = None if level == 1.0 else HostSpeed(0.0, period_s, 0, level)
        return [simulate_summary(deployment, model, trace, slo, speed)]
    return [simulate_summary(deployment, model, trace, slo,
                             HostSpeed(sigma, period_s, seed, level))
            for seed in range(replicates)]


def speed_level(run: dict[str, Any], profile: Profile) -> float | None:
    """The speed level of a measured run: the geometric mean of the speed probes before
    and after it over the profile's probe (None where either has no probe, or the run's
    probes ran another model, dtype or thread count than the profile's)."""
    probe = run.get("host_probe")
    if not profile.speed_probe_ms or not probe:
        return None
    ours = {"model": profile.model, "dtype": profile.dtype, "threads": profile.threads}
    try:
        before, after = (float(probe[k]["speed_probe_ms"]) for k in ("before", "after"))
        if any(probe[k].get(key, value) != value
               for k in ("before", "after") for key, value in ours.items()):
            return None
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    if not before > 0 or not after > 0:
        return None
    return float((before * after) ** 0.5 / profile.speed_probe_ms)


def figure(summary: dict[str, Any], key: str, stat: str | None) -> float | None:
    value = summary[key] if stat is None else summary[key].get(stat)
    return None if value is None else float(value)


def _band(values: list[float]) -> tuple[float, float]:
    """(10th, 90th) percentile of the runs' values (the value itself for one run)."""
    if len(values) == 1:
        return values[0], values[0]
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    return deciles[0], deciles[-1]


def comparison_rows(predicted: dict[float, list[dict[str, Any]]],
                    measured: dict[float, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per rate and figure: predicted (the median over the runs' summaries) with the runs'
    band, measured, and (predicted - measured) / measured."""
    rows = []
    for rate in sorted(predicted):
        for key, stat in FIGURES:
            values = [v for run in predicted[rate] if (v := figure(run, key, stat)) is not None]
            p = statistics.median(values) if values else None
            m = figure(measured[rate], key, stat) if rate in measured else None
            error = (p - m) / m if p is not None and m else None
            rows.append({"rate": rate, "figure": key if stat is None else f"{key} {stat}",
                         "predicted": p, "band": _band(values) if values else None,
                         "runs": len(values), "measured": m, "error": error})
    return rows


def _measured_runs(path: Path) -> dict[float, dict[str, Any]]:
    """A sweep's runs by rate."""
    data = report.load(path)
    return {float(r["request_rate"]): r for r in data["runs"]
            if isinstance(r["request_rate"], (int, float))}


def _fmt(value: float | None, width: int = 9) -> str:
    return f"{value:{width}.2f}" if value is not None else f"{'-':>{width}}"


def print_table(name: str, rows: list[dict[str, Any]]) -> None:
    print(f"=== {name}: predicted / measured (error)")
    for rate, group in itertools.groupby(rows, key=lambda r: r["rate"]):
        cells = []
        for row in group:
            err = f"{row['error'] * 100:+.0f}%" if row["error"] is not None else "-"
            band = row.get("band")
            spread = (f" [{_fmt(band[0], 0)}-{_fmt(band[1], 0)}]"
                      if band is not None and row.get("runs", 1) > 1 else "")
            cells.append(f"{row['figure']} {_fmt(row['predicted'], 0)}{spread} / "
                         f"{_fmt(row['measured'], 0)} ({err})")
        print(f"  rate {rate:g}: " + "; ".join(cells))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="splitserve bench simulate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", required=True, help="from `splitserve profile`")
    ap.add_argument("--rates", default=None, help="default: the measured rates, else 0.5,1,1.5,2")
    ap.add_argument("--num-requests", type=int, default=30)
    ap.add_argument("--slo", default="tpot_ms=90,ttft_ms=5000")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workload-args", default=DEFAULT_WORKLOAD_ARGS)
    ap.add_argument("--measured-dir", default=None, help="a `bench disagg --out-dir`")
    ap.add_argument("--out", default=None, help="write predictions (and errors) as JSON")
    ap.add_argument("--replicates", type=int, default=None,
                    help=f"runs per rate under the speed drift (default {DEFAULT_REPLICATES} "
                         "with one, else 1)")
    ap.add_argument("--speed-sigma", type=float, default=None,
                    help="the drift's sigma (default: the profile's speed_sigma)")
    ap.add_argument("--speed-period-s", type=float, default=None,
                    help="the drift's period (default: the profile's speed_period_s)")
    ap.add_argument("--no-speed-level", action="store_true",
                    help="every rate at the profile's speed, whatever the sweep's probes saw")
    args = ap.parse_args(argv)
    profile = Profile.load(args.profile)
    model = ProfiledStepTimes(profile)
    sigma = profile.speed_sigma if args.speed_sigma is None else args.speed_sigma
    period_s = profile.speed_period_s if args.speed_period_s is None else args.speed_period_s
    if not sigma >= 0 or not period_s > 0:
        ap.error(f"the speed drift needs sigma >= 0 and a period > 0, got {sigma}, {period_s}")
    replicates = (args.replicates if args.replicates is not None
                  else DEFAULT_REPLICATES if sigma > 0 else 1)
    if replicates < 1 or (replicates > 1 and sigma == 0):
        ap.error(f"--replicates {replicates}: give 1, or more with a speed drift (the "
                 f"profile's speed_sigma is {profile.speed_sigma}; see --speed-sigma)")
    if replicates > 1:
        print(f"{replicates} runs per rate under a speed drift of sigma {sigma:.3f} per "
              f"{period_s:g} s: medians [10th-90th percentile]")
    workload = parse_workload(args.workload_args, args.seed)
    slo = parse_slo(args.slo)
    measured: dict[str, dict[float, dict[str, Any]]] = {}
    if args.measured_dir:
        for name in disagg.CONFIGS:
            path = Path(args.measured_dir) / f"{name}.json"
            if path.exists():
                measured[name] = _measured_runs(path)
    rates = ([float(r) for r in args.rates.split(",")] if args.rates else
             sorted({r for runs in measured.values() for r in runs}) or [0.5, 1.0, 1.5, 2.0])
    out: dict[str, Any] = {"profile": args.profile, "slo": slo, "rates": rates,
                           "replicates": replicates, "speed_sigma": sigma,
                           "speed_period_s": period_s, "configs": {}}
    for name in disagg.CONFIGS:
        deployment = deployment_of(name)
        runs = measured.get(name, {})
        levels = {rate: level for rate in rates if rate in runs and not args.no_speed_level
                  and (level := speed_level(runs[rate], profile)) is not None}
        predicted = {rate: replicate_summaries(deployment, model,
                                               make_trace(workload, rate, args.num_requests),
                                               slo, replicates, sigma, period_s,
                                               levels.get(rate, 1.0))
                     for rate in rates}
        rows = comparison_rows(predicted, {rate: run["summary"] for rate, run in runs.items()})
        print_table(f"{name} ({deployment.name})", rows)
        if levels:
            print(f"  speed level (the sweep's probes over the profile's "
                  f"{profile.speed_probe_ms:.2f} ms): " + ", ".join(
                      f"rate {rate:g} {level:.3f}" for rate, level in sorted(levels.items())))
        elif runs and not args.no_speed_level:
            why = ("the profile has no speed probe (speed_probe_ms 0)"
                   if not profile.speed_probe_ms else
                   "the sweep has no speed probes of the profile's engine setting "
                   "(bench disagg --speed-probe-s)")
            print(f"  every rate at the profile's speed: {why}")
        errors = [abs(r["error"]) for r in rows if r["error"] is not None]
        if errors:
            print(f"  largest |error| {max(errors) * 100:.0f}% over {len(errors)} figures")
        out["configs"][name] = rows
        out.setdefault("speed_levels", {})[name] = {str(r): v for r, v in levels.items()}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return 0
