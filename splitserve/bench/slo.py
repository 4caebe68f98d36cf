"""`splitserve bench slo`: goodput under overload, plain admission vs SLO-aware admission.

    splitserve bench slo [--model smollm2-135m] [--overload 3] [--ttft-slo-ms 2000]
                         [--duration 60] [--max-inflight 4] [--out-dir results/slo]

A router (`--max-inflight` slots, a long queue) and one decode worker as plain processes on
127.0.0.1, driven by `splitserve bench serve` over gRPC. In one invocation:

1. capacity: a closed loop of --max-inflight requests for --capacity-duration seconds gives
   the request rate the deployment sustains;
2. plain: Poisson arrivals at --overload times that rate for --duration seconds; every
   request waits its turn;
3. slo: the same arrivals, each request carrying `ttft_slo_ms`; the router refuses at once
   those it predicts would miss it (router.slo).

Goodput counts requests whose TTFT met --ttft-slo-ms, per second of the run. Printed: each
phase's goodput, the ratio slo/plain (issue 17's target: >= 1.5x), and how long refusals
took (target: every one within 50 ms).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from splitserve.bench import serve
from splitserve.bench.procs import add_single_worker_args, single_worker_deployment


def _phase(args: argparse.Namespace, name: str, serve_args: list[str]) -> dict[str, Any]:
    out = Path(args.out_dir) / f"{name}.json"
    with single_worker_deployment(args, ("--max-queued", "100000")) as addrs:
        code = serve.main([
            "--target", f"grpc://{addrs['router']}", "--label", name, "--workload", "fixed",
            "--input-len", str(args.input_len), "--output-len", str(args.output_len),
            "--seed", str(args.seed), "--slo", f"ttft_ms={args.ttft_slo_ms}",
            "--out", str(out), "--no-progress", "--warmup", "2", "--grace", str(args.grace),
            *serve_args])
    if code != 0:
        raise SystemExit(f"bench serve failed in phase {name} (exit {code})")
    return dict(json.loads(out.read_text())["summary"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="splitserve bench slo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_single_worker_args(ap)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--overload", type=float, default=3.0, help="times the measured capacity")
    ap.add_argument("--ttft-slo-ms", type=int, default=2000)
    ap.add_argument("--capacity-duration", type=float, default=20.0)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--grace", type=float, default=30.0,
                    help="after --duration: how long queued requests may still finish")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default="results/slo")
    args = ap.parse_args(argv)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    capacity = _phase(args, "capacity", ["--concurrency", str(args.max_inflight),
                                         "--duration", str(args.capacity_duration)])
    rate = args.overload * capacity["request_throughput"]
    print(f"capacity: {capacity['request_throughput']:.2f} req/s; offering {rate:.2f} req/s",
          flush=True)
    timed = ["--request-rate", f"{rate:.4f}", "--duration", str(args.duration)]
    plain = _phase(args, "plain", timed)
    slo = _phase(args, "slo", [*timed, "--extra-body",
                               json.dumps({"ttft_slo_ms": args.ttft_slo_ms})])
    print(f"{'phase':8s} {'sent':>5s} {'done':>5s} {'refused':>7s} {'goodput':>8s} "
          f"{'TTFT p50':>9s} {'TTFT p99':>9s} {'refusal p99/max':>16s}")
    for name, s in (("plain", plain), ("slo", slo)):
        refused = s["failed_e2e_ms"]
        print(f"{name:8s} {s['num_requests']:5d} {s['completed']:5d} {s['failed']:7d} "
              f"{s['goodput']:8.2f} {s['ttft_ms']['p50'] or 0:7.0f}ms "
              f"{s['ttft_ms']['p99'] or 0:7.0f}ms "
              f"{refused['p99'] or 0:7.1f}/{refused['max'] or 0:.1f}ms")
    ratio = slo["goodput"] / plain["goodput"] if plain["goodput"] else float("inf")
    print(f"goodput slo/plain = {ratio:.2f} (requests meeting TTFT <= {args.ttft_slo_ms} ms "
          "per second)")
    summary = {"capacity_rps": capacity["request_throughput"], "offered_rps": rate,
               "goodput_plain": plain["goodput"], "goodput_slo": slo["goodput"],
               "goodput_ratio": ratio, "refusal_ms": slo["failed_e2e_ms"]}
    (Path(args.out_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0
