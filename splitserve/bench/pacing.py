"""`splitserve bench pacing`: paced streams (Andes, issue 17) against the same load unpaced.

A router and one decode worker (prefilling its own prompts) run as plain processes on
127.0.0.1. Over gRPC, --paced-concurrency clients and --unpaced-concurrency clients each
keep one request outstanding (closed loop: the next goes as soon as one ends), all with
greedy sampling and ignore_eos, for --seconds per phase, in one invocation:

1. `unpaced`: every request unpaced (the baseline);
2. `paced`: the paced clients ask for stream_pace=--pace tokens/s, the others as before.

Printed per phase: the inter-token gaps the paced clients saw (p50 / p99, against the
pace's interval: issue 17's target is a p99 within 20% of it) and the output tokens per
second the unpaced clients received, with the ratio paced/unpaced phase (the target:
above 1, the steps paced streams save go to the others). Tokens count when they arrive
inside the window; gaps are between consecutive tokens of one stream (the first token's
wait is TTFT, not a gap).
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitserve.bench.procs import add_single_worker_args, single_worker_deployment

GROUPS = ("paced", "unpaced")


@dataclass
class GroupTally:
    output_tokens: int = 0  # arrived inside the window
    requests: int = 0  # finished inside the window
    gaps_s: list[float] = field(default_factory=list)

    def row(self, seconds: float) -> dict[str, Any]:
        gaps = sorted(self.gaps_s)
        pick = (lambda q: gaps[min(len(gaps) - 1, int(q * len(gaps)))]) if gaps else None
        return {"requests": self.requests, "output_tokens": self.output_tokens,
                "tokens_per_s": self.output_tokens / seconds, "num_gaps": len(gaps),
                "gap_p50_s": pick(0.50) if pick else None,
                "gap_p99_s": pick(0.99) if pick else None}


def _drive(address: str, concurrency: dict[str, int], paces: dict[str, float],
           seconds: float, args: argparse.Namespace, seed: int) -> dict[str, GroupTally]:
    """Each group keeps its concurrency of requests outstanding for `seconds`."""
    from splitserve.client import Client

    tallies = {name: GroupTally() for name in concurrency}
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def loop(name: str, index: int) -> None:
        rng = random.Random(seed * 1000 + index + (0 if name == "paced" else 500))
        pace: dict[str, Any] = {"stream_pace": paces[name]} if paces.get(name) else {}
        with Client(address, timeout=600) as client:
            while time.monotonic() < end:
                prompt = [rng.randrange(100, 40000) for _ in range(args.input_len)]
                last: float | None = None
                for chunk in client.stream(prompt, max_tokens=args.output_len,
                                           temperature=0.0, ignore_eos=True, **pace):
                    now = time.monotonic()
                    if not chunk.token_ids or now > end:
                        continue
                    with lock:
                        tally = tallies[name]
                        tally.output_tokens += len(chunk.token_ids)
                        if last is not None:  # a chunk of k tokens: k gaps of a k-th each
                            tally.gaps_s += [(now - last) / len(chunk.token_ids)] * len(
                                chunk.token_ids)
                    last = now
                if time.monotonic() <= end:
                    with lock:
                        tallies[name].requests += 1

    jobs = [(name, i) for name, n in concurrency.items() for i in range(n)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        for future in [pool.submit(loop, name, i) for name, i in jobs]:
            future.result()
    return tallies


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _print(results: dict[str, dict[str, Any]], pace: float) -> None:
    interval_ms = 1000.0 / pace
    print(f"{'phase':8s} {'clients':8s} {'requests':>8s} {'tok/s':>7s} {'gap p50':>8s} "
          f"{'gap p99':>8s} {'p99 vs ' + format(interval_ms, '.0f') + ' ms':>12s}")
    for phase, rows in results.items():
        for name, row in rows.items():
            p50, p99 = row["gap_p50_s"], row["gap_p99_s"]
            off = "" if p99 is None else f"{(p99 * 1e3 - interval_ms) / interval_ms:+12.0%}"
            print(f"{phase:8s} {name:8s} {row['requests']:8d} {row['tokens_per_s']:7.1f} "
                  f"{(p50 or 0) * 1e3:6.1f}ms {(p99 or 0) * 1e3:6.1f}ms {off}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="splitserve bench pacing", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_single_worker_args(ap)
    ap.set_defaults(max_inflight=64)  # every client's request in the worker's batch
    ap.add_argument("--pace", type=float, default=20.0, help="the paced streams' tokens/s")
    ap.add_argument("--paced-concurrency", type=int, default=4)
    ap.add_argument("--unpaced-concurrency", type=int, default=4)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=30.0, help="per phase")
    ap.add_argument("--warmup-seconds", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    concurrency = {"paced": args.paced_concurrency, "unpaced": args.unpaced_concurrency}
    results: dict[str, dict[str, Any]] = {}
    with single_worker_deployment(args) as addrs:
        _drive(addrs["router"], {"unpaced": 1}, {}, args.warmup_seconds, args, args.seed + 99)
        for phase, paces in (("unpaced", {}), ("paced", {"paced": args.pace})):
            tallies = _drive(addrs["router"], concurrency, paces, args.seconds, args,
                             args.seed)
            results[phase] = {name: tally.row(args.seconds) for name, tally in tallies.items()}
    _print(results, args.pace)
    interval_s = 1.0 / args.pace
    paced_p99 = results["paced"]["paced"]["gap_p99_s"]
    summary = {
        "pace_tokens_per_s": args.pace,
        "paced_gap_p50_s": results["paced"]["paced"]["gap_p50_s"],
        "paced_gap_p99_s": paced_p99,
        "paced_gap_p99_over_interval": _ratio(paced_p99, interval_s),
        "unpaced_tokens_per_s_ratio": _ratio(results["paced"]["unpaced"]["tokens_per_s"],
                                             results["unpaced"]["unpaced"]["tokens_per_s"]),
    }
    print(f"paced gap p99 / {interval_s * 1e3:.0f} ms = {summary['paced_gap_p99_over_interval']}"
          f"; unpaced tok/s paced/unpaced phase = {summary['unpaced_tokens_per_s_ratio']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"argv": argv, "results": results,
                                              "summary": summary}, indent=2))
    return 0
