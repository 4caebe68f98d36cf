"""`splitserve bench fairness`: two clients share one service, one of them flooding it.

A router (API keys `flood` and `light`, `--max-inflight` slots) and one decode worker run
as plain processes on 127.0.0.1. Over gRPC, `flood` keeps --flood-concurrency requests
outstanding and `light` --light-concurrency (both backlogged: each client sends its next
request as soon as one ends; flood keeps ten times as many outstanding; with light at
--max-inflight, both stay backlogged in the router's queue). The flood starts
--flood-lead-seconds first: the light client joins a service the flood already saturates,
and the window of --seconds opens when it does. Three phases in one invocation:

1. `light` alone (its unloaded TTFT: the baseline);
2. both clients, `--admission-policy fcfs` (arrival order);
3. both clients, `--admission-policy vtc` (fair share by virtual token counters).
In phase 2 the decode worker runs `--no-fair-share` too; in phase 3 its scheduler shares
fairly as well (with a high --max-inflight and a low --max-num-seqs the requests queue
there, and a light request takes its share of the running batch at once).

Printed: output tokens served to each client in each phase and their ratio (issue 17's
target: within 1.25x under VTC), and light's TTFT p50/p99 against its unloaded TTFT
(target: p99 within 2x).

`--scenario priority` replaces phase 3: `light` asks for class 0 and `flood` for class 5
(FCFS within a class), to see a high class keep its TTFT while a low class saturates the
service (issue 17's target: p99 within 1.5x of unloaded). With a high --max-inflight and a
low --max-num-seqs the requests queue in the decode worker's scheduler, where classes
decide too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitserve.bench.procs import add_single_worker_args, single_worker_deployment

CLIENTS = ("flood", "light")


@dataclass
class ClientTally:
    output_tokens: int = 0
    requests: int = 0
    ttft_s: list[float] = field(default_factory=list)
    sent_s: list[float] = field(default_factory=list)  # each TTFT's send time in the window

    def record(self, started: float, first_s: float | None, finished: float, in_window: int,
               start: float, end: float) -> None:
        """One request sent at `started` (first token `first_s` after it, None: none),
        finished at `finished`, `in_window` of its tokens inside the window [start, end]:
        its tokens count; it counts as a request if sent and finished inside the window;
        its TTFT counts if it was sent inside the window, however late it finished."""
        self.output_tokens += in_window
        if start <= started <= end:
            if finished <= end:
                self.requests += 1
            if first_s is not None:
                self.ttft_s.append(first_s)
                self.sent_s.append(started - start)

    def row(self, seconds: float) -> dict[str, Any]:
        ttft = sorted(self.ttft_s)
        pick = (lambda q: ttft[min(len(ttft) - 1, int(q * len(ttft)))]) if ttft else None
        return {"requests": self.requests, "output_tokens": self.output_tokens,
                "tokens_per_s": self.output_tokens / seconds,
                "ttft_p50_s": pick(0.50) if pick else None,
                "ttft_p99_s": pick(0.99) if pick else None,
                "ttft_by_send_s": [[round(t, 3), round(f, 4)]
                                   for t, f in zip(self.sent_s, self.ttft_s, strict=True)]}


def _drive(address: str, keys: dict[str, str], concurrency: dict[str, int], seconds: float,
           prompt_len: int, output_len: int, seed: int,
           priorities: dict[str, int] | None = None,
           lead_s: float = 0.0) -> dict[str, ClientTally]:
    """Each client keeps its concurrency of requests outstanding (in its priority class,
    default 0). `flood` starts `lead_s` before the others (so they join a service it
    already saturates, not a cold start where every client's first requests arrive in the
    same millisecond); the measurement window is the `seconds` after that. Service is the
    output tokens that arrived inside the window (a request queued for longer than the
    window is long still counts what it got in it); requests are those sent and finished
    inside it; TTFTs are those of every request sent inside it, however late its first
    token came (the loop waits for it: leaving out the requests that finish after the
    window would leave out the slowest first tokens, the ones a crowded-out client gets)."""
    from splitserve.client import Client

    tallies = {name: ClientTally() for name in concurrency}
    lock = threading.Lock()
    lead_s = lead_s if "flood" in concurrency else 0.0
    start = time.monotonic() + lead_s  # the window: [start, end]
    end = start + seconds

    def loop(name: str, index: int) -> None:
        rng = random.Random(seed * 1000 + index + (0 if name == "flood" else 500))
        if name != "flood":
            time.sleep(max(0.0, start - time.monotonic()))
        with Client(address, token=keys[name], timeout=600) as client:
            while time.monotonic() < end:
                prompt = [rng.randrange(100, 40000) for _ in range(prompt_len)]
                started = time.monotonic()
                first: float | None = None
                in_window = 0  # tokens that arrived inside the window, whenever sent
                for chunk in client.stream(prompt, max_tokens=output_len, temperature=0.0,
                                           ignore_eos=True,
                                           priority=(priorities or {}).get(name, 0)):
                    now = time.monotonic()
                    if chunk.token_ids and first is None:
                        first = now - started
                    if start <= now <= end:
                        in_window += len(chunk.token_ids)
                with lock:
                    tallies[name].record(started, first, time.monotonic(), in_window, start,
                                         end)

    jobs = [(name, i) for name, n in concurrency.items() for i in range(n)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        for future in [pool.submit(loop, name, i) for name, i in jobs]:
            future.result()
    return tallies


def _phase(args: argparse.Namespace, keys: dict[str, str], policy: str,
           concurrency: dict[str, int], priorities: dict[str, int] | None = None
           ) -> dict[str, Any]:
    router_args = ("--max-queued", "1024", "--admission-policy", policy)
    # FCFS is FCFS everywhere: the decode worker's scheduler too (else it shares fairly).
    worker_args = ("--no-fair-share",) if policy == "fcfs" else ()
    with single_worker_deployment(args, router_args, worker_args) as addrs:
        _drive(addrs["router"], keys, {"light": 1}, args.warmup_seconds, args.input_len,
               args.output_len, args.seed + 99)
        tallies = _drive(addrs["router"], keys, concurrency, args.seconds, args.input_len,
                         args.output_len, args.seed, priorities, args.flood_lead_seconds)
    return {name: tally.row(args.seconds) for name, tally in tallies.items()}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="splitserve bench fairness", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_single_worker_args(ap)
    ap.add_argument("--scenario", choices=["fair", "priority"], default="fair",
                    help="fair: FCFS vs VTC; priority: the light client in class 0 and the "
                         "flood in class 5, vs both in one class (set --max-inflight high "
                         "and --max-num-seqs low to queue in the decode worker)")
    ap.add_argument("--flood-concurrency", type=int, default=40)
    ap.add_argument("--light-concurrency", type=int, default=4)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--warmup-seconds", type=float, default=5.0)
    ap.add_argument("--flood-lead-seconds", type=float, default=5.0,
                    help="the flood runs this long before the light client joins and the "
                         "measurement window opens (0: both start at once)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    keys = {name: f"{name}-{secrets.token_hex(12)}" for name in CLIENTS}
    both = {"flood": args.flood_concurrency, "light": args.light_concurrency}
    saved = os.environ.get("SPLITSERVE_API_KEYS")
    # The processes started here inherit the keys; this process keeps what it had.
    os.environ["SPLITSERVE_API_KEYS"] = ",".join(f"{n}:{k}" for n, k in keys.items())
    try:
        alone = _phase(args, keys, "vtc", {"light": args.light_concurrency})
        if args.scenario == "priority":  # light in class 0, the flood in class 5
            results = {"alone": alone, "fcfs": _phase(args, keys, "fcfs", both),
                       "priority": _phase(args, keys, "fcfs", both, {"flood": 5})}
        else:
            results = {"alone": alone, "fcfs": _phase(args, keys, "fcfs", both),
                       "vtc": _phase(args, keys, "vtc", both)}
    finally:
        if saved is None:
            os.environ.pop("SPLITSERVE_API_KEYS", None)
        else:
            os.environ["SPLITSERVE_API_KEYS"] = saved
    alone_p50 = results["alone"]["light"]["ttft_p50_s"]
    print(f"{'phase':6s} {'client':6s} {'requests':>8s} {'tok/s':>7s} {'TTFT p50':>9s} "
          f"{'TTFT p99':>9s} {'p99 / alone p50':>15s}")
    for phase, rows in results.items():
        for name, row in rows.items():
            vs = _ratio(row["ttft_p99_s"], alone_p50)
            print(f"{phase:6s} {name:6s} {row['requests']:8d} {row['tokens_per_s']:7.1f} "
                  f"{(row['ttft_p50_s'] or 0) * 1e3:7.0f}ms {(row['ttft_p99_s'] or 0) * 1e3:7.0f}ms "
                  f"{vs if vs is not None else float('nan'):15.2f}")
    summary = {}
    for phase in [p for p in results if p != "alone"]:
        flood, light = (results[phase][c]["output_tokens"] for c in CLIENTS)
        summary[phase] = {"flood_over_light_tokens": _ratio(flood, light),
                          "light_ttft_p99_over_alone_p50": _ratio(
                              results[phase]["light"]["ttft_p99_s"], alone_p50),
                          "light_ttft_p99_over_alone_p99": _ratio(
                              results[phase]["light"]["ttft_p99_s"],
                              results["alone"]["light"]["ttft_p99_s"])}
        print(f"{phase}: tokens served flood/light = {summary[phase]['flood_over_light_tokens']}"
              f"; light TTFT p99 / alone p99 = {summary[phase]['light_ttft_p99_over_alone_p99']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"argv": argv, "results": results,
                                              "summary": summary}, indent=2))
    return 0
