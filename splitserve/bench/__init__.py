"""`splitserve bench <name>`: benchmarks that print ratios against a baseline run in the
same invocation (DESIGN: measure, then claim). Each module has a main(argv) -> int."""

from __future__ import annotations

import importlib
import signal
import sys
from types import FrameType

BENCHMARKS = {
    "offline": ("splitserve.bench.offline", "engine vs transformers generate (tokens/s)"),
    "kv": ("splitserve.bench.kv", "disaggregated vs colocated TTFT, KV transfer exposure"),
    "serve": ("splitserve.bench.serve", "load test grpc:// (SplitServe) or http:// (any OpenAI "
              "API): TTFT/TPOT/ITL/E2E, goodput, sweeps"),
    "disagg": ("splitserve.bench.disagg", "the disaggregation experiment: 1P+1D vs 2 colocated "
               "replicas, Poisson rate sweep, goodput"),
    "chaos": ("splitserve.bench.chaos", "faults under load (kill -9, drain, frozen prefill, "
              "cancels): lost requests, exactness, resume pauses, leaked blocks"),
    "fuzz": ("splitserve.bench.fuzz", "fuzz the HTTP and gRPC APIs: 5xx, crashes, tracebacks, "
             "RSS, normal-request latency, oversized bodies (413 time, heartbeats)"),
    "fairness": ("splitserve.bench.fairness", "two clients, one flooding: tokens served to "
                 "each and the light client's TTFT, FCFS vs VTC fair share vs alone"),
    "slo": ("splitserve.bench.slo", "goodput under overload: plain admission vs SLO-aware "
            "admission (refusals at once), capacity measured first"),
    "pacing": ("splitserve.bench.pacing", "paced streams (Andes) at a reading pace beside "
               "unpaced ones: the paced gaps vs the pace, the others' tok/s vs all unpaced"),
    "kv-tier": ("splitserve.bench.kv_tier", "multi-turn chats on a too-small KV pool: TTFT "
                "of later turns without and with the host KV tier, tokens identical"),
    "peer": ("splitserve.bench.peer", "served throughput vs llama.cpp's llama-server (optional, "
             "by path) and vs the engine offline, same workload, same threads"),
    "pd-control": ("splitserve.bench.pd_control", "closed-loop P:D control (role switches) "
                   "vs static 1:2 and 2:1 splits on a mix that shifts halfway: goodput per half"),
    "simulate": ("splitserve.sim.sweep", "the disagg sweep in the calibrated simulator, "
                 "predicted beside measured (--measured-dir)"),
    "route": ("splitserve.sim.route_bench", "routing decisions/s over 1,000 simulated "
              "workers (policy + cluster store; no model)"),
    "compare": ("splitserve.bench.compare", "compare `bench serve` result files side by side"),
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
        print("usage: splitserve bench {" + ",".join(BENCHMARKS) + "} [options]")
        for name, (_, doc) in BENCHMARKS.items():
            print(f"  {name:10s} {doc}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(BENCHMARKS[argv[0]][0])
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    return int(module.main(argv[1:]) or 0)


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM (`timeout`, `kill`) ends a benchmark like Ctrl-C does: by an exception, so
    the deployments and servers it started are stopped on the way out (Python's default
    SIGTERM ends the process at once and leaves its workers running)."""
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
