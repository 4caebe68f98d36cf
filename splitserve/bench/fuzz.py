"""A long fuzz of the router's public APIs, and what it costs the service (issue 13).

    splitserve bench fuzz [--model M] [--http-cases 10000] [--grpc-cases 2000]
                          [--big-bodies 10] [--big-body-mb 10] [--seed N]
                          [--log-dir DIR] [--out results/fuzz.json]

A router (--max-request-bytes, default 4 MiB) and one decode worker as plain processes on
127.0.0.1, their stdout/stderr in files; the model is a tiny random-weight one written to
a temp folder unless --model names one. Cases come from splitserve.bench.fuzz_cases (the
strategies tests/http/test_hardening.py uses), drawn by hypothesis: random unless --seed
is given, no shrinking. Generated max_tokens above 4 become 4, so accepted requests stay
short. Three phases:
  1. HTTP: --http-cases requests, a fresh connection each: half drawn OpenAI bodies on
     /v1/completions and /v1/chat/completions, a quarter non-JSON bodies there, a quarter
     any method on any path with any body;
  2. gRPC: --grpc-cases messages for splitserve.v1.SplitServe/Generate, sent raw: two
     fifths generated GenerateRequests, two fifths random bytes, a fifth requests cut short.
     After every 1,000 cases of either phase, a normal completion (max_tokens 4) over HTTP
     and over gRPC, timed;
  3. big bodies: --big-bodies concurrent POSTs to /v1/completions, each declaring and
     writing --big-body-mb MiB (a client that writes it all before reading the reply).
Targets, each PASS/FAIL (exit status 1 unless all pass): no HTTP 5xx and no dropped
connection; no gRPC status outside fuzz_clients.GOOD_CODES (INTERNAL and UNKNOWN fail), no
OK stream without a clean finish; no process exited; no "Traceback" in their logs; the
router's RSS after phase 2 within 10% of its RSS after one warm-up request; every normal
request served within 1 s; every big body answered 413 within 100 ms of its first byte;
the router's RSS (sampled every 10 ms) never 50 MiB above where phase 3 began; the worker
still registered, and no heartbeat failure or re-registration in its log.
The counts printed are the cases actually sent.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from splitserve.bench import fuzz_clients as clients
from splitserve.bench.fuzz_report import (
    BATCH,
    MiB,
    format_report,
    grpc_failed,
    http_failed,
    targets,
)
from splitserve.bench.fuzz_service import HEARTBEAT_TTL_S, FuzzService, RssSampler, rss_bytes

HTTP_SHARES = {"api": 0.5, "garbage": 0.25, "route": 0.25}
GRPC_SHARES = {"request": 0.4, "bytes": 0.4, "truncated": 0.2}
MAX_TOKENS_CAP = 4


@dataclass
class Tally:
    """Cases sent, by kind; replies, by status; the first failing cases."""

    sent: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def add(self, kind: str, case: object, status: str, failed: bool) -> None:
        self.sent[kind] += 1
        self.statuses[status] += 1
        if failed and len(self.failures) < 20:
            self.failures.append(f"{status}: {case!r}"[:400])


def _split(size: int, shares: dict[str, float]) -> dict[str, int]:
    """`size` cases divided by share, summing to `size`."""
    counts, done, acc = {}, 0, 0.0
    for kind, share in shares.items():
        acc += share * size
        counts[kind] = round(acc) - done
        done += counts[kind]
    return counts


def _fuzz(total: int, strategies: dict[str, Any], shares: dict[str, float],
          send: Callable[[Any], str], failed: Callable[[str], bool],
          probe: Callable[[Tally], None], service: FuzzService, seed: int | None) -> Tally:
    """Send `total` cases in batches of BATCH, `probe` after each; stop early once a
    process exited."""
    from splitserve.bench.fuzz_cases import run_examples

    tally = Tally()

    def handle(case: Any) -> None:
        status = send(case)
        tally.add(case.kind, case, status, failed(status))

    for batch, first in enumerate(range(0, total, BATCH)):
        for k, (kind, n) in enumerate(_split(min(BATCH, total - first), shares).items()):
            if n:
                run_examples(strategies[kind], n, handle,
                             None if seed is None else seed * 100_003 + batch * 8 + k)
        probe(tally)
        if service.exited():
            break
    return tally


def _num_failed(tally: Tally, failed: Callable[[str], bool]) -> int:
    return sum(n for status, n in tally.statuses.items() if failed(status))


def _prober(service: FuzzService, generate: grpc.UnaryStreamMultiCallable, phase: str,
            failed: Callable[[str], bool], out: list[dict[str, Any]]
            ) -> Callable[[Tally], None]:
    """A probe: one normal completion over each API, recorded in `out`; a progress line."""

    def probe(tally: Tally) -> None:
        sent = sum(tally.sent.values())
        for api, (status, seconds) in (("http", clients.normal_http(service.http_address)),
                                       ("grpc", clients.normal_grpc(generate))):
            out.append({"phase": phase, "after_cases": sent, "api": api, "status": status,
                        "seconds": round(seconds, 4)})
        print(f"{phase}: {sent} cases sent, {_num_failed(tally, failed)} failed; normal "
              f"request {out[-2]['status']} in {out[-2]['seconds']:.3f} s over HTTP, "
              f"{out[-1]['status']} in {out[-1]['seconds']:.3f} s over gRPC", flush=True)

    return probe


def _big_bodies(service: FuzzService, count: int, size: int) -> dict[str, Any]:
    """Phase 3: `count` oversized POSTs at once; RSS, registration and heartbeats around
    (read one heartbeat TTL later, when a beat the router missed has shown)."""
    body = clients.big_body(size)
    trouble = service.heartbeat_trouble()
    before = rss_bytes(service.router_pid)
    sampler = RssSampler(service.router_pid)
    start = threading.Barrier(count, timeout=30)
    with ThreadPoolExecutor(count) as pool:
        posts = list(pool.map(lambda _: clients.post_big(service.http_address, body, start),
                              range(count)))
    time.sleep(HEARTBEAT_TTL_S + 0.5)
    figures = {"posts": [asdict(p) for p in posts], "body_bytes": size,
               "rss_before_bytes": before, "rss_peak_bytes": sampler.stop(),
               "live_workers": [], "heartbeat_trouble": 0}
    if "router" not in service.exited():
        figures.update(rss_after_bytes=rss_bytes(service.router_pid),
                       live_workers=service.live_workers(),
                       heartbeat_trouble=service.heartbeat_trouble() - trouble)
    return figures


def _phase(tally: Tally) -> dict[str, Any]:
    return {"sent": dict(tally.sent), "statuses": dict(tally.statuses),
            "failures": tally.failures}


def _run(service: FuzzService, args: argparse.Namespace) -> dict[str, Any]:
    """The three phases; the figures the targets are judged on."""
    from splitserve.bench.fuzz_cases import grpc_cases, http_cases

    figures: dict[str, Any] = {"probes": []}
    with grpc.insecure_channel(service.grpc_address) as channel:
        generate = clients.raw_generate(channel)
        figures["warm_up"] = [clients.normal_http(service.http_address)[0],
                              clients.normal_grpc(generate)[0]]
        figures["rss_start_bytes"] = rss_bytes(service.router_pid)
        figures["http"] = _phase(_fuzz(
            args.http_cases, http_cases(MAX_TOKENS_CAP), HTTP_SHARES,
            lambda case: clients.send_http(service.http_address, case), http_failed,
            _prober(service, generate, "http", http_failed, figures["probes"]),
            service, args.seed))
        if not service.exited():
            figures["grpc"] = _phase(_fuzz(
                args.grpc_cases, grpc_cases(MAX_TOKENS_CAP), GRPC_SHARES,
                lambda case: clients.send_grpc(generate, case), grpc_failed,
                _prober(service, generate, "grpc", grpc_failed, figures["probes"]),
                service, args.seed))
    if not service.exited():
        figures["rss_end_bytes"] = rss_bytes(service.router_pid)
        if args.big_bodies:
            figures["big_bodies"] = _big_bodies(service, args.big_bodies,
                                                int(args.big_body_mb * MiB))
    figures["exited"] = service.exited()
    return figures


def _tiny_model(folder: Path) -> str:
    from splitserve.engine.tiny_model import write_tiny_model

    return str(write_tiny_model(folder / "model", num_heads=4, num_kv_heads=2))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="splitserve bench fuzz")
    ap.add_argument("--model", default=None,
                    help="default: a tiny random-weight model written to a temp folder")
    ap.add_argument("--http-cases", type=int, default=10_000)
    ap.add_argument("--grpc-cases", type=int, default=2_000)
    ap.add_argument("--big-bodies", type=int, default=10, help="oversized POSTs at once")
    ap.add_argument("--big-body-mb", type=float, default=10.0, help="their size in MiB")
    ap.add_argument("--max-request-bytes", type=int, default=4 * MiB,
                    help="the router's --max-request-bytes")
    ap.add_argument("--seed", type=int, default=None, help="draw the same cases every run")
    ap.add_argument("--log-dir", default=None,
                    help="keep the processes' stdout/stderr here (default: a temp folder)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    try:
        from splitserve.bench.fuzz_cases import storage_in
    except ModuleNotFoundError as exc:
        if exc.name != "hypothesis":
            raise
        print("splitserve bench fuzz draws its cases with hypothesis, which is not installed:"
              " install the dev extras (pip install -e '.[dev]')", file=sys.stderr)
        return 2
    if args.big_bodies and args.big_body_mb * MiB <= args.max_request_bytes:
        ap.error("--big-body-mb must exceed --max-request-bytes")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="splitserve-fuzz-") as tmp:
        log_dir = Path(args.log_dir or tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        service = FuzzService(log_dir)
        try:
            service.start(args.model or _tiny_model(Path(tmp)), args.max_request_bytes)
            with storage_in(Path(tmp) / "hypothesis"):
                figures = _run(service, args)
        finally:
            service.stop()
        figures["tracebacks"] = service.tracebacks()
        figures["traceback_excerpts"] = service.traceback_excerpts()
    figures.update(model=args.model or "tiny random-weight llama", seed=args.seed,
                   max_request_bytes=args.max_request_bytes,
                   seconds=round(time.monotonic() - started, 1))
    figures["targets"] = targets(figures, args)
    figures["passed"] = all(row["pass"] for row in figures["targets"])
    print(format_report(figures, {"http": args.http_cases, "grpc": args.grpc_cases}))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(figures, indent=2))
    return 0 if figures["passed"] else 1
