"""`splitserve bench serve`: load-test a serving endpoint, SplitServe or any OpenAI server.

    splitserve bench serve --target grpc://127.0.0.1:50051 --workload synthetic \\
        --request-rate 4 --num-requests 200 --slo ttft_ms=500,tpot_ms=50 \\
        --out results.json --plot-dir plots/
    splitserve bench serve --target http://127.0.0.1:8000 --workload mixed \\
        --sweep-rates 1,2,4,8 --duration 60 --out sweep.json --plot-dir plots/
    splitserve bench serve --target http://127.0.0.1:8000 --workload fixed --duration 60 \
        --client name=flood,rate=10,api_key=K1 --client name=light,rate=1,api_key=K2
    splitserve bench compare results-a.json results-b.json

Every engine is measured the same way: client-side timestamps of every streamed chunk (see
metrics.py for the definitions), the same seeded prompts (workloads.py), the same arrival
schedule (arrivals.py, runner.py). Prints a summary table (a row per rate for a sweep);
--out writes every request's timings as JSON, --plot-dir writes PNG plots.
Exit status: 0, or 1 when no request of some run completed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import platform
import secrets
import sys
from collections.abc import Callable
from typing import Any

from splitserve.bench import clients as multi
from splitserve.bench import plots, report, vllm_format
from splitserve.bench.metrics import parse_slo, summarize, summarize_by_tag
from splitserve.bench.runner import RunConfig, RunResult, run
from splitserve.bench.targets import API_MODES, Target, TargetConfig, make_target
from splitserve.bench.workloads import KINDS, WorkloadConfig, make_workload

HostProbe = Callable[[], dict[str, Any]]  # a measurement of the host between runs

_DEFAULT_NUM_REQUESTS = 100  # when neither --num-requests nor --duration is given


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="splitserve bench serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    t = ap.add_argument_group("target")
    t.add_argument("--target", required=True,
                   help="grpc://host:port (SplitServe) or http(s)://host:port (OpenAI API)")
    t.add_argument("--label", help="name of this run in tables and plots (default: target)")
    t.add_argument("--api", choices=API_MODES, default="auto",
                   help="auto: prompts to completions, conversations to chat")
    t.add_argument("--model", help="model name to request (HTTP default: first of "
                   "/v1/models; gRPC default: the deployment's model)")
    t.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    t.add_argument("--temperature", type=float, default=0.0)
    t.add_argument("--extra-body", default="{}",
                   help="JSON object merged into every request (HTTP body / gRPC sampling)")
    w = ap.add_argument_group("workload")
    w.add_argument("--workload", choices=KINDS, default=None, help="default: synthetic")
    w.add_argument("--dataset", help="JSONL file ({'prompt'} or {'messages'}, 'max_tokens')")
    w.add_argument("--seed", type=int, default=None,
                   help="prompts and arrivals (default: a fresh random seed, printed, so "
                        "that runs against a live deployment do not hit its prefix cache)")
    w.add_argument("--input-len", type=int, help="tokens (synthetic: median, default 200)")
    w.add_argument("--output-len", type=int, help="tokens (synthetic: median, default 150)")
    w.add_argument("--max-input-len", type=int, default=1024)
    w.add_argument("--max-output-len", type=int, default=512)
    w.add_argument("--prefix-len", type=int, default=1000, help="shared-prefix system prompt")
    w.add_argument("--num-prefixes", type=int, default=1, help="shared-prefix: prompt groups")
    w.add_argument("--question-len", type=int, default=24, help="shared-prefix question")
    w.add_argument("--num-turns", type=int, default=4, help="multi-turn: turns per chat")
    w.add_argument("--long-input-len", type=int, default=1000, help="mixed: long prompts")
    w.add_argument("--long-fraction", type=float, default=0.2, help="mixed: share of long")
    w.add_argument("--no-ignore-eos", action="store_true",
                   help="let the model stop at EOS (output lengths then vary by engine)")
    a = ap.add_argument_group("load")
    a.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests/s, Poisson by default (default inf: all at once)")
    a.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of arrival gaps: 1 Poisson, <1 burstier")
    a.add_argument("--concurrency", type=int,
                   help="max requests in flight (closed loop when no rate is given)")
    a.add_argument("--num-requests", type=int, help=f"default {_DEFAULT_NUM_REQUESTS} "
                   "unless --duration is given")
    a.add_argument("--duration", type=float, help="stop sending after this many seconds")
    a.add_argument("--grace", type=float, default=30.0,
                   help="after --duration, seconds in-flight requests may still take")
    a.add_argument("--max-time", type=float, default=3600.0, help="hard limit on a run (s)")
    a.add_argument("--request-timeout", type=float, default=600.0, help="per request (s)")
    a.add_argument("--warmup", type=int, default=0,
                   help="requests sent and discarded before measuring")
    a.add_argument("--sweep-rates", help="comma-separated rates run in turn, e.g. 1,2,4,8")
    a.add_argument("--client", action="append", default=[], metavar="SPEC",
                   help="a client of its own (repeatable): name=N[,rate=R][,concurrency=C]"
                        "[,num_requests=K][,api_key=KEY][,priority=P][,ttft_slo_ms=MS]"
                        "[,stream_pace=TOK_S|NAME][,weight=W]; all run at once, reported "
                        "per client with the fairness gap (bench/clients.py)")
    o = ap.add_argument_group("output")
    o.add_argument("--slo", help="objectives for goodput, e.g. ttft_ms=500,tpot_ms=50")
    o.add_argument("--percentiles", default="50,90,99")
    o.add_argument("--out", help="results JSON")
    o.add_argument("--result-format", choices=("splitserve", "vllm"), default="splitserve",
                   help="--out in our format (every request's timings) or in the flat keys "
                        "of `vllm bench serve` (single runs)")
    o.add_argument("--plot-dir", help="directory for PNG plots")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


@dataclasses.dataclass(frozen=True)
class ServeArgs:
    """Validated configuration of one `bench serve` invocation."""

    target: TargetConfig
    workload: WorkloadConfig
    runs: tuple[RunConfig, ...]  # one per rate (one unless sweeping)
    sweep: bool
    slo: dict[str, float]
    percentiles: tuple[float, ...]
    label: str
    warmup: int
    clients: tuple[multi.ClientSpec, ...] = ()


def parse_args(argv: list[str]) -> tuple[ServeArgs, argparse.Namespace]:
    """argparse plus validation; ValueError with a message for bad combinations."""
    ns = build_parser().parse_args(argv)
    if ns.seed is None:
        ns.seed = secrets.randbits(31)
        print(f"seed: {ns.seed} (pass --seed {ns.seed} to repeat this workload)",
              file=sys.stderr)
    if ns.result_format == "vllm" and ns.sweep_rates:
        raise ValueError("--result-format vllm writes single runs; drop --sweep-rates")
    extra = json.loads(ns.extra_body)
    if not isinstance(extra, dict):
        raise ValueError("--extra-body must be a JSON object")
    target = TargetConfig(url=ns.target, api=ns.api, model=ns.model,
                          temperature=ns.temperature, api_key=ns.api_key, extra=extra,
                          request_timeout_s=ns.request_timeout)
    kind = ns.workload or ("dataset" if ns.dataset else "synthetic")
    workload = WorkloadConfig(
        kind=kind, seed=ns.seed, input_len=ns.input_len, output_len=ns.output_len,
        max_input_len=ns.max_input_len, max_output_len=ns.max_output_len,
        prefix_len=ns.prefix_len, num_prefixes=ns.num_prefixes, question_len=ns.question_len,
        num_turns=ns.num_turns, long_input_len=ns.long_input_len,
        long_fraction=ns.long_fraction, dataset=ns.dataset, ignore_eos=not ns.no_ignore_eos)
    rates = ([float(r) for r in ns.sweep_rates.split(",") if r.strip()] if ns.sweep_rates
             else [ns.request_rate])
    num = ns.num_requests
    if num is None and ns.duration is None:
        num = _DEFAULT_NUM_REQUESTS
    runs = tuple(RunConfig(request_rate=r, burstiness=ns.burstiness,
                           concurrency=ns.concurrency, num_requests=num,
                           duration_s=ns.duration, grace_s=ns.grace, max_time_s=ns.max_time,
                           request_timeout_s=ns.request_timeout, seed=ns.seed)
                 for r in rates)
    make_workload(workload)  # a dataset file is read (and checked) here
    clients = [multi.parse_client(text) for text in ns.client]
    multi.check_clients(clients)
    if clients and ns.sweep_rates:
        raise ValueError("--client runs are single runs; drop --sweep-rates")
    if clients and ns.result_format == "vllm":
        raise ValueError("--result-format vllm has no per-client results; drop it")
    for client in clients:
        multi.client_run_config(client, runs[0])  # a bad rate or count fails here
    percentiles = tuple(float(p) for p in ns.percentiles.split(",") if p.strip())
    if not percentiles or not all(0 <= p <= 100 for p in percentiles):
        raise ValueError("--percentiles must be numbers in [0, 100]")
    if ns.warmup < 0:
        raise ValueError("--warmup must be >= 0")
    return ServeArgs(target, workload, runs, bool(ns.sweep_rates), parse_slo(ns.slo),
                     percentiles, ns.label or ns.target, ns.warmup, tuple(clients)), ns


def _config_json(args: ServeArgs, target: Target, argv: list[str]) -> dict[str, Any]:
    target_cfg = dataclasses.asdict(args.target)
    target_cfg.pop("api_key")  # never write secrets into results
    target_cfg["resolved_model"] = getattr(target, "model", None)
    return {"argv": argv, "host": platform.node(), "python": platform.python_version(),
            "target": target_cfg, "workload": dataclasses.asdict(args.workload),
            "slo": args.slo, "percentiles": list(args.percentiles), "warmup": args.warmup}


async def _warmup(target: Target, args: ServeArgs, progress: bool) -> None:
    workload = make_workload(dataclasses.replace(args.workload, seed=args.workload.seed + 1))
    cfg = RunConfig(num_requests=args.warmup, concurrency=min(args.warmup, 8),
                    max_time_s=args.runs[0].max_time_s,
                    request_timeout_s=args.runs[0].request_timeout_s)
    result = await run(target, workload, cfg, progress)
    ok = sum(r.ok for r in result.records)
    print(f"warm-up: {ok}/{len(result.records)} requests completed", file=sys.stderr)


async def _bench(args: ServeArgs, argv: list[str], progress: bool,
                 probe_host: HostProbe | None = None,
                 ) -> tuple[dict[str, Any], list[tuple[float, RunResult]], list[dict[str, Any]]]:
    target = make_target(args.target)
    await target.open()
    try:
        if args.warmup:
            await _warmup(target, args, progress)
        results = []
        probes = []  # probe_host() before each run and after the last (none without it)
        if args.sweep:
            print(report.sweep_header(), flush=True)
        for cfg in args.runs:
            if probe_host is not None:
                probes.append(probe_host())
            if args.clients:
                result = await multi.run_clients(args.target, args.workload, cfg,
                                                 list(args.clients), progress)
            else:
                result = await run(target, make_workload(args.workload), cfg, progress)
            results.append((cfg.request_rate, result))
            if args.sweep:
                summary = summarize(result.records, args.slo, percentiles=args.percentiles)
                print(report.sweep_row(cfg.request_rate, summary), flush=True)
        if probe_host is not None:
            probes.append(probe_host())
        return _config_json(args, target, argv), results, probes
    finally:
        await target.close()


def _run_json(args: ServeArgs, config: dict[str, Any], cfg: RunConfig, result: RunResult,
              host_probe: dict[str, Any] | None = None) -> dict[str, Any]:
    summary = summarize(result.records, args.slo, percentiles=args.percentiles)
    by_tag = summarize_by_tag(result.records, args.slo)
    extra: dict[str, Any] = {} if host_probe is None else {"host_probe": host_probe}
    if args.clients:  # a summary per client (its records are tagged with its name)
        by_tag = {c.name: summarize([r for r in result.records
                                     if multi.client_of(r.tag) == c.name],
                                    args.slo, summary["duration_s"], args.percentiles)
                  for c in args.clients}
        extra["clients"] = {**multi.fairness(result.records, list(args.clients)),
                            "specs": [dataclasses.asdict(c) | {"api_key": None}
                                      for c in args.clients]}
    return report.run_json(
        args.label, {**config, "run": dataclasses.asdict(cfg)}, summary, by_tag,
        result.records, request_rate=cfg.request_rate, start_unix_s=result.start_unix_s,
        wall_s=result.wall_s, stopped_by=result.stopped_by,
        peak_in_flight=result.peak_in_flight, **extra)


def main(argv: list[str] | None = None, probe_host: HostProbe | None = None) -> int:
    """`probe_host` (a caller's, e.g. bench disagg's speed probe): called before each run
    and after the last, with no request in flight; each run records the calls around it as
    {"before": ..., "after": ...} under "host_probe"."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, ns = parse_args(argv)
    except (ValueError, OSError) as err:
        print(f"splitserve bench serve: error: {err}", file=sys.stderr)
        return 2
    try:
        config, results, probes = asyncio.run(
            _bench(args, argv, progress=not ns.no_progress, probe_host=probe_host))
    except KeyboardInterrupt:
        print("interrupted: no results", file=sys.stderr)
        return 130
    runs = [_run_json(args, config, cfg, result,
                      {"before": probes[i], "after": probes[i + 1]} if probes else None)
            for i, (cfg, (_, result)) in enumerate(zip(args.runs, results, strict=True))]
    if args.sweep:
        data = report.sweep_json(args.label, config, runs)
    else:
        data = runs[0]
        print(report.format_summary(data["summary"], args.label, data["by_tag"]))
        if "clients" in data:
            print(multi.format_fairness(data["clients"]))
    if ns.out and ns.result_format == "vllm":
        cfg, result = args.runs[0], results[0][1]
        report.save(ns.out, vllm_format.to_vllm(
            runs[0]["summary"], result.records, request_rate=cfg.request_rate,
            max_concurrency=cfg.concurrency, model_id=config["target"]["resolved_model"],
            percentiles=args.percentiles))
        print(f"results (vLLM format): {ns.out}", file=sys.stderr)
    elif ns.out:
        report.save(ns.out, data)
        print(f"results: {ns.out}", file=sys.stderr)
    if ns.plot_dir:
        written = _plot(results, runs, args.sweep, ns.plot_dir, args.label)
        print(f"plots: {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0 if all(run["summary"]["completed"] for run in runs) else 1


def _plot(results: list[tuple[float, RunResult]], runs: list[dict[str, Any]], sweep: bool,
          plot_dir: str, label: str) -> list[Any]:
    if not sweep:
        records = results[0][1].records
        return [*plots.plot_cdfs({label: records}, plot_dir),
                plots.plot_timeline(records, plot_dir)]
    series = {f"{rate:g} req/s": result.records for rate, result in results}
    return [*plots.plot_cdfs(series, plot_dir),
            *plots.plot_sweep([rate for rate, _ in results], [run["summary"] for run in runs],
                              plot_dir)]


if __name__ == "__main__":
    sys.exit(main())
