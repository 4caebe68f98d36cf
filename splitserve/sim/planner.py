"""`splitserve plan`: which prefill:decode split serves a rate best, from a profile.

    splitserve plan --rate R --slo ttft_ms=..,tpot_ms=.. --profile P.json [--gpus N]
                    [--workload-args "..."] [--num-requests 200] [--thresholds 0]

Simulates every deployment of 1..N devices (one worker per device): colocated (N decode
workers that prefill their own prompts) and every P prefill + D decode split, each with
the router's local_prefill_threshold from --thresholds (0: every prompt prefilled
remotely). The same seeded trace at R req/s goes to each. A configuration is feasible
when at least --min-attainment of the requests meet the SLO; feasible ones rank by
goodput per device, then goodput. The profile's threads setting is the only per-role
setting there is (one per profile; tensor parallelism does not exist here).
Then it says why the winner wins, in particular when colocated beats disaggregation
(short prompts: little prefill work to take off the decode workers, and a prefill worker
that idles is a device that does not decode).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from splitserve.bench.metrics import parse_slo, summarize
from splitserve.sim.cluster import Deployment, SimRequest, Simulation
from splitserve.sim.profile import Profile, ProfiledStepTimes
from splitserve.sim.sweep import DEFAULT_WORKLOAD_ARGS, make_trace, parse_workload


@dataclass(frozen=True)
class Candidate:
    deployment: Deployment
    summary: dict[str, Any]
    prefill_utilization: float
    decode_utilization: float

    @property
    def num_devices(self) -> int:
        return self.deployment.num_workers

    @property
    def goodput_per_device(self) -> float:
        return float(self.summary["goodput"]) / self.num_devices

    @property
    def attainment(self) -> float:
        n = self.summary["num_requests"]
        return self.summary["good_requests"] / n if n else 0.0

    @property
    def colocated(self) -> bool:
        return self.deployment.num_prefill == 0


def deployments(max_devices: int, thresholds: list[int]) -> list[Deployment]:
    """Every colocated and P:D deployment on 1..max_devices devices."""
    out = []
    for n in range(1, max_devices + 1):
        out.append(Deployment(num_prefill=0, num_decode=n))
        for p in range(1, n):
            out += [Deployment(num_prefill=p, num_decode=n - p, local_prefill_threshold=t)
                    for t in thresholds]
    return out


def evaluate(deployment: Deployment, model: ProfiledStepTimes, trace: list[SimRequest],
             slo: dict[str, float]) -> Candidate:
    sim = Simulation(deployment, model)
    summary = summarize(sim.run(trace), slo)
    return Candidate(deployment, summary, sim.utilization("prefill"), sim.utilization("decode"))


def rank(candidates: list[Candidate], min_attainment: float) -> list[Candidate]:
    """Feasible first (attainment >= min_attainment), each part by goodput per device,
    then goodput, then fewer devices."""
    def key(c: Candidate) -> tuple[bool, float, float, int]:
        return (c.attainment < min_attainment, -c.goodput_per_device,
                -float(c.summary["goodput"]), c.num_devices)

    return sorted(candidates, key=key)


def describe(c: Candidate) -> str:
    s = c.summary
    d = c.deployment
    route = "" if d.num_prefill == 0 else f", local prefill <= {d.local_prefill_threshold} tokens"
    util = (f"decode busy {c.decode_utilization * 100:.0f}%" if d.num_prefill == 0 else
            f"prefill busy {c.prefill_utilization * 100:.0f}%, "
            f"decode busy {c.decode_utilization * 100:.0f}%")
    return (f"{d.name:<15} {c.goodput_per_device:7.3f} /device  goodput {s['goodput']:6.3f}  "
            f"SLO met {c.attainment * 100:5.1f}%  TTFT p50/p99 "
            f"{s['ttft_ms']['p50'] or 0:7.0f}/{s['ttft_ms']['p99'] or 0:7.0f} ms  TPOT p50/p99 "
            f"{s['tpot_ms']['p50'] or 0:5.1f}/{s['tpot_ms']['p99'] or 0:5.1f} ms  ({util}{route})")


def explain(ranked: list[Candidate], trace: list[SimRequest], model: ProfiledStepTimes) -> str:
    """Why the best configuration wins over the best of the other kind."""
    best = ranked[0]
    others = [c for c in ranked if c.colocated != best.colocated]
    prompt = sum(r.prompt_tokens for r in trace) / len(trace)
    output = sum(r.max_tokens for r in trace) / len(trace)
    prefill_ms = sum(model.prefill_ms(r.prompt_tokens) for r in trace) / len(trace)
    decode_ms = output * model.decode_ms(1, prompt + output / 2)
    share = prefill_ms / (prefill_ms + decode_ms)
    work = (f"mean prompt {prompt:.0f} tokens, mean output {output:.0f}; prefill is ~"
            f"{share * 100:.0f}% of a request's engine time at batch 1")
    if not others:
        return f"only {'colocated' if best.colocated else 'disaggregated'} configurations ran ({work})"
    rival = others[0]
    gap = best.goodput_per_device - rival.goodput_per_device
    if best.colocated:
        why = (f"colocated wins: {best.deployment.name} gives {gap:.3f} req/s per device more "
               f"goodput than the best split, {rival.deployment.name} ({work}). A prefill "
               f"worker only pays when prefill interference breaks the decode SLO; here its "
               f"prefill workers are busy {rival.prefill_utilization * 100:.0f}% of the time, "
               f"and every device they take is one that does not decode (vLLM's docs: "
               f"disaggregation does not raise throughput, it trades it for tail latency).")
    else:
        why = (f"disaggregation wins: {best.deployment.name} gives {gap:.3f} req/s per device "
               f"more goodput than {rival.deployment.name} ({work}); colocated TPOT p99 "
               f"{rival.summary['tpot_ms']['p99'] or 0:.1f} ms vs "
               f"{best.summary['tpot_ms']['p99'] or 0:.1f} ms: long prefills stall colocated "
               f"decodes past the SLO, a dedicated prefill worker keeps them out.")
    return why


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--rate", type=float, required=True, help="offered requests/s")
    ap.add_argument("--slo", required=True, help="e.g. ttft_ms=5000,tpot_ms=90")
    ap.add_argument("--profile", required=True, help="from `splitserve profile`")
    ap.add_argument("--gpus", type=int, default=4, help="most devices (workers) to use")
    ap.add_argument("--workload", default="mixed", help="a bench serve workload kind")
    ap.add_argument("--workload-args", default=DEFAULT_WORKLOAD_ARGS)
    ap.add_argument("--num-requests", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--thresholds", default="0",
                    help="router local_prefill_threshold values tried for splits")
    ap.add_argument("--min-attainment", type=float, default=0.9)
    ap.add_argument("--top", type=int, default=5)


def run(args: argparse.Namespace) -> int:
    if args.gpus < 1 or not args.rate > 0:
        raise SystemExit("splitserve plan: --gpus must be >= 1 and --rate > 0")
    model = ProfiledStepTimes(Profile.load(args.profile))
    slo = parse_slo(args.slo)
    workload = parse_workload(args.workload_args, args.seed, args.workload)
    trace = make_trace(workload, args.rate, args.num_requests)
    thresholds = [int(t) for t in args.thresholds.split(",") if t.strip()]
    candidates = [evaluate(d, model, trace, slo) for d in deployments(args.gpus, thresholds)]
    ranked = rank(candidates, args.min_attainment)
    p = model.profile
    print(f"profile: {p.model} {p.dtype}, {p.threads} thread(s), {p.hardware.get('cpu', '?')}; "
          f"rate {args.rate:g} req/s, SLO {slo}, {len(trace)} requests, "
          f"{len(candidates)} configurations on 1..{args.gpus} devices")
    print(f"top {min(args.top, len(ranked))} (feasible: SLO met for >= "
          f"{args.min_attainment * 100:.0f}% of requests):")
    for c in ranked[: args.top]:
        mark = " " if c.attainment >= args.min_attainment else "!"
        print(f" {mark}{describe(c)}")
    if ranked[0].attainment < args.min_attainment:
        print(f"no configuration on {args.gpus} devices meets the SLO for "
              f"{args.min_attainment * 100:.0f}% of requests at {args.rate:g} req/s")
    print(explain(ranked, trace, model))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="splitserve plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_args(argv))
