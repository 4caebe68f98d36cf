"""Closed-loop P:D control against static splits, on a workload whose mix shifts halfway.

    splitserve bench pd-control [--model smollm2-135m] [--dtype bfloat16] [--phase-s 60]
        [--rate-a 4.5] [--rate-b 1.3] [--slo ttft_ms=3000,tpot_ms=100]
        [--configs control,1:2,2:1] [--control-start 1:2] [--pd-tpot-signal live|finished]
        [--seed 0] [--out f.json]

Three workers as plain processes (one CPU thread each, all started --flippable) behind
one router, in each configuration of the same invocation:
  1:2, 2:1   static splits (prefill:decode), no controller;
  control    the router's --pd-control, starting from --control-start.
Every configuration gets the same seeded Poisson arrivals: for --phase-s seconds short
prompts (--short-input words, prefilled on the decode worker itself: conditional
disaggregation) with long outputs (--long-output tokens) at --rate-a, then for as long
long prompts (--long-input words, prefilled remotely) with short outputs at --rate-b.
Goodput (requests/s meeting both objectives of --slo) is computed per half over the
half's arrival span, and overall; the controller's goodput is printed as a ratio to the
best and to the worse static split of each half. In a whole run a split that is wrong
for the first half carries its backlog into the second; --isolated-halves also runs each
static split on each half alone (fresh processes, that half's requests from t = 0).
The P:D counts are sampled every 0.5 s from the router's cluster state, and the
controller's switches are printed with the time each took (from the router's metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from splitserve.bench.metrics import RequestRecord, meets_slo, parse_slo, percentile
from splitserve.bench.procs import free_port, local_deployment
from splitserve.bench.targets import GrpcTarget, TargetConfig
from splitserve.bench.text import words
from splitserve.bench.workloads import BenchRequest

_LOCAL_PREFILL_THRESHOLD = 32  # short prompts at most this long are prefilled on D
_GRACE_S = 180.0  # after the last arrival, how long requests may still run


def schedule(args: argparse.Namespace) -> list[tuple[float, BenchRequest]]:
    """(arrival offset s, request), phase A then phase B, from one seeded generator."""
    rng = random.Random(args.seed)
    out: list[tuple[float, BenchRequest]] = []
    phases = (("A", args.rate_a, args.short_input, args.long_output),
              ("B", args.rate_b, args.long_input, args.short_output))
    for index, (tag, rate, n_in, n_out) in enumerate(phases):
        start = t = index * args.phase_s
        while True:
            t += rng.expovariate(rate)
            if t >= start + args.phase_s:
                break
            out.append((t, BenchRequest(prompt=words(rng, n_in), max_tokens=n_out,
                                        prompt_len=n_in, tag=tag)))
    return out


async def drive(address: str, plan: list[tuple[float, BenchRequest]]
                ) -> tuple[list[RequestRecord], list[tuple[float, int, int]]]:
    """Send `plan` open loop; the records, and (t, prefill, decode) workers registered in
    the router's cluster state every 0.5 s."""
    from splitserve.cluster.remote import RemoteClusterStore
    from splitserve.cluster.store import WorkerRole
    from splitserve.common import envs

    target = GrpcTarget(TargetConfig(url=f"grpc://{address}", request_timeout_s=_GRACE_S))
    await target.open()
    t0 = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - t0

    records: list[RequestRecord] = []
    timeline: list[tuple[float, int, int]] = []

    async def one(request: BenchRequest, record: RequestRecord) -> None:
        try:
            await asyncio.wait_for(target.send(request, record, clock), _GRACE_S)
        except Exception as exc:  # noqa: BLE001 - a failure is a result
            record.fail(clock(), f"{type(exc).__name__}: {exc}")

    store = RemoteClusterStore(address, token=envs.cluster_token())

    async def sample_roles() -> None:
        while True:
            live = await asyncio.to_thread(store.live_workers)
            roles = [info.role for info, _ in live]
            timeline.append((clock(), roles.count(WorkerRole.PREFILL),
                             roles.count(WorkerRole.DECODE)))
            await asyncio.sleep(0.5)

    sampler = asyncio.create_task(sample_roles())
    tasks = []
    try:
        for index, (due, request) in enumerate(plan):
            await asyncio.sleep(max(0.0, due - clock()))
            record = RequestRecord(index=index, tag=request.tag, scheduled_s=due,
                                   prompt_tokens=request.prompt_len)
            records.append(record)
            tasks.append(asyncio.create_task(one(request, record)))
        await asyncio.gather(*tasks)
    finally:
        sampler.cancel()
        await target.close()
        store.close()
    return records, timeline


def _scrape(metrics_url: str) -> dict[str, float]:
    """The router's pd_* samples: {"prefill": n, "decode": n, "<direction>_<result>": n,
    "switch_s_sum": s, "switch_drain_s_count": n, ...} ({} without a controller)."""
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r'splitserve_pd_workers\{role="(\w+)"\} (\S+)', line)
        if m:
            out[m.group(1)] = float(m.group(2))
        m = re.match(r'splitserve_pd_role_switches_total\{direction="(\w+)",result="(\w+)"\} '
                     r'(\S+)', line)
        if m:
            out[f"{m.group(1)}_{m.group(2)}"] = float(m.group(3))
        m = re.match(r"splitserve_pd_role_switch_(drain_)?seconds_(sum|count) (\S+)", line)
        if m:
            out[f"switch_{m.group(1) or ''}s_{m.group(2)}"] = float(m.group(3))
    return out


def summarize(records: list[RequestRecord], slo: dict[str, float], phase_s: float
              ) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, tags, span in (("A", {"A"}, phase_s), ("B", {"B"}, phase_s),
                             ("all", {"A", "B"}, 2 * phase_s)):
        chosen = [r for r in records if r.tag in tags]
        done = [r for r in chosen if r.ok]
        ttft = [v for r in done if (v := r.ttft_ms) is not None]
        tpot = [v for r in done if (v := r.tpot_ms) is not None]
        good = sum(meets_slo(r, slo) for r in done)
        out[name] = {
            "requests": len(chosen), "completed": len(done), "good": good,
            "goodput": good / span,
            "ttft_p90_ms": percentile(ttft, 90) if ttft else None,
            "tpot_p90_ms": percentile(tpot, 90) if tpot else None,
        }
    return out


def _split(text: str) -> tuple[int, int]:
    p, _, d = text.partition(":")
    return int(p), int(d)


def half_alone(plan: list[tuple[float, BenchRequest]], half: str, phase_s: float
               ) -> list[tuple[float, BenchRequest]]:
    """One half's requests, arriving from t = 0 (an isolated run of that half)."""
    shift = phase_s if half == "B" else 0.0
    return [(t - shift, r) for t, r in plan if r.tag == half]


def run_config(name: str, args: argparse.Namespace, plan: list[tuple[float, BenchRequest]],
               slo: dict[str, float]) -> dict[str, Any]:
    """`name`: control, a static split P:D, or P:D/A, P:D/B (that half alone)."""
    split, _, half = name.partition("/")
    if half:
        plan = half_alone(plan, half, args.phase_s)
    num_prefill, num_decode = _split(args.control_start if name == "control" else split)
    http_port = free_port()
    router_args = ["--http-port", str(http_port), "--max-inflight", "256"]
    if name == "control":
        router_args += ["--pd-control", "--pd-slo", args.slo, "--pd-period", "1",
                        "--pd-window", str(args.pd_window), "--pd-consecutive",
                        str(args.pd_consecutive), "--pd-cooldown", str(args.pd_cooldown),
                        "--pd-headroom", str(args.pd_headroom), "--pd-prefill-queue-tokens",
                        str(args.pd_prefill_queue_tokens), "--pd-tpot-signal",
                        args.pd_tpot_signal]
    # One long prompt per prefill step: its TTFT is its own compute plus its wait, and a
    # backlog shows as queued prompt tokens (2048 batched four prompts into one slow step).
    worker_args = ("--flippable", "--no-prefix-caching", "--num-kv-blocks", "1024",
                   "--dtype", args.dtype, "--max-num-seqs", "64",
                   "--max-num-batched-tokens", str(args.long_input))
    print(f"=== {name}: start {num_prefill}P:{num_decode}D", flush=True)
    with local_deployment(args.model, num_prefill=num_prefill, num_decode=num_decode,
                          local_prefill_threshold=_LOCAL_PREFILL_THRESHOLD, threads=1,
                          worker_args=worker_args, router_args=tuple(router_args)) as addrs:
        _warm_up(addrs["router"], args)
        time.sleep(args.pd_window if name == "control" else 0.0)  # warm-up out of the window
        metrics_url = f"http://127.0.0.1:{http_port}/metrics"
        records, timeline = asyncio.run(drive(addrs["router"], plan))
        final = _scrape(metrics_url)
    result = {"name": name, "summary": summarize(records, slo, args.phase_s),
              "timeline": timeline, "controller": final,
              "errors": sorted({r.error for r in records if r.error})[:5],
              # per request: (arrival s, half, TTFT ms, TPOT ms, met the SLO)
              "requests": [(r.scheduled_s, r.tag, r.ttft_ms, r.tpot_ms, meets_slo(r, slo))
                           for r in records]}
    _print_config(result)
    return result


def _warm_up(address: str, args: argparse.Namespace) -> None:
    """One request of each kind (first gloo pairs, first steps), sequentially."""
    from splitserve.client import Client

    rng = random.Random(-1)
    with Client(address, timeout=120) as client:
        for n_in in (args.short_input, args.long_input, args.long_input):
            client.generate(words(rng, n_in), max_tokens=4, ignore_eos=True)


def _print_config(result: dict[str, Any]) -> None:
    for half, s in result["summary"].items():
        print(f"  {half:3s} goodput {s['goodput']:.3f} req/s  good {s['good']}/{s['requests']}"
              f"  completed {s['completed']}  TTFT p90 {_ms(s['ttft_p90_ms'])}  TPOT p90 "
              f"{_ms(s['tpot_p90_ms'])}", flush=True)
    changes = _changes(result["timeline"])
    if len(changes) > 1:
        print("  P:D over time: " + ", ".join(f"{t:.1f}s {p}P:{d}D" for t, p, d in changes))
    ctl = result["controller"]
    count = ctl.get("switch_s_count")
    if count:
        serving_ms = ctl["switch_s_sum"] / count * 1e3
        drained_s = ctl["switch_drain_s_sum"] / count
        results = ", ".join(f"{k} {v:g}" for k, v in ctl.items()
                            if k.endswith(("_done", "_failed")))
        print(f"  switches: {int(count)}; serving in the new role after {serving_ms:.1f} ms, "
              f"previous role drained after {drained_s:.2f} s (means); {results}")
    if result["errors"]:
        print(f"  errors: {result['errors']}")


def _changes(timeline: list[tuple[float, int, int]]) -> list[tuple[float, int, int]]:
    out: list[tuple[float, int, int]] = []
    for t, p, d in timeline:
        if not out or (out[-1][1], out[-1][2]) != (p, d):
            out.append((t, p, d))
    return out


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def comparison(results: dict[str, dict[str, Any]]) -> Iterator[str]:
    """Lines: the controller's goodput in each half against the best and the worse static
    split, from the whole runs and (when run) from each half alone."""
    if "control" not in results:
        return
    whole = [n for n in results if n != "control" and "/" not in n]
    for half in ("A", "B", "all"):
        ctl = results["control"]["summary"][half]["goodput"]
        for label, names, key in (("", whole, half),
                                  (" alone", [n for n in results if n.endswith(f"/{half}")],
                                   half)):
            if len(names) < 2:
                continue
            ranked = sorted(names, key=lambda n: results[n]["summary"][key]["goodput"])
            worse, best = ranked[0], ranked[-1]
            g_best = results[best]["summary"][key]["goodput"]
            g_worse = results[worse]["summary"][key]["goodput"]
            yield (f"  {half:3s} control {ctl:.3f} req/s; best static{label} {best} "
                   f"{g_best:.3f} (x{_ratio(ctl, g_best)}), worse static{label} {worse} "
                   f"{g_worse:.3f} (x{_ratio(ctl, g_worse)})")


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "inf"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="splitserve bench pd-control")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--phase-s", type=float, default=60.0, help="seconds of each half")
    ap.add_argument("--rate-a", type=float, default=4.5, help="req/s of the first half")
    ap.add_argument("--rate-b", type=float, default=1.3, help="req/s of the second half")
    ap.add_argument("--short-input", type=int, default=16)
    ap.add_argument("--long-output", type=int, default=128)
    ap.add_argument("--long-input", type=int, default=512)
    ap.add_argument("--short-output", type=int, default=8)
    ap.add_argument("--slo", default="ttft_ms=3000,tpot_ms=100")
    ap.add_argument("--configs", default="control,1:2,2:1",
                    help="control, static splits P:D, and P:D/A or P:D/B: that half alone")
    ap.add_argument("--isolated-halves", action="store_true",
                    help="also run each static split on each half alone (1:2/A, 1:2/B, "
                         "2:1/A, 2:1/B): the best split for a half without the other's "
                         "backlog")
    ap.add_argument("--control-start", default="1:2", help="the controller's first P:D split")
    ap.add_argument("--pd-window", type=float, default=6.0)
    ap.add_argument("--pd-consecutive", type=int, default=2)
    ap.add_argument("--pd-cooldown", type=float, default=15.0)
    ap.add_argument("--pd-headroom", type=float, default=0.8)
    ap.add_argument("--pd-prefill-queue-tokens", type=int, default=512,
                    help="the controller's backlog signal: a long prompt waiting per prefill "
                         "worker")
    ap.add_argument("--pd-tpot-signal", default="finished", choices=["live", "finished"],
                    help="the controller's TPOT signal (serve --pd-tpot-signal)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write every result here (JSON)")
    args = ap.parse_args(argv)
    slo = parse_slo(args.slo)
    plan = schedule(args)
    print(f"workload: {sum(r.tag == 'A' for _, r in plan)} requests of {args.short_input} "
          f"in / {args.long_output} out at {args.rate_a}/s, then "
          f"{sum(r.tag == 'B' for _, r in plan)} of {args.long_input} in / "
          f"{args.short_output} out at {args.rate_b}/s; {args.phase_s:g} s each; SLO {slo}",
          flush=True)
    names = args.configs.split(",")
    if args.isolated_halves:
        names += [f"{split}/{half}" for split in ("1:2", "2:1") for half in ("A", "B")]
    results = {name: run_config(name, args, plan, slo) for name in names}
    print("goodput, controller vs static splits:")
    for line in comparison(results):
        print(line)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results},
                                             indent=1))
    return 0
