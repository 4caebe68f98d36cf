"""Faults under load: does any request get lost, repeated, or leave a KV block behind?

    splitserve bench chaos [--model smollm2-135m] [--num-requests 96] [--concurrency 24]
                           [--max-tokens 64] [--faults kill,term,stop,pkill,cancel] [--seed 0]
                           [--max-faults N] [--max-resumes 4] [--out results/chaos.json]

One deployment of plain processes on 127.0.0.1: a router, one prefill worker and two decode
workers (one CPU thread each, each hosting its own KV rendezvous store, so a killed worker
drops its store too). The same
seeded requests (greedy and seeded sampling, short and long prompts) run twice:
  1. reference: no fault;
  2. chaos: once half the concurrent streams have their first token, a fault injector
     hits one worker at a time, a random 1-3 s apart:
       kill   SIGKILL a decode worker (restarted a second later, at a new port)
       term   SIGTERM a decode worker (graceful drain: its streams migrate), restarted
       stop   SIGSTOP the prefill worker for 3 s, then SIGCONT (its calls wait it out or,
              past the router's prefill deadline where one is set, resume elsewhere;
              the health probes need ~14 s of silence to call it lost)
       pkill  SIGKILL the prefill worker (restarted a second later): its prompts resume,
              prefilled locally until it is back
       redis  (only when named: cluster state then lives in a redis-server the bench
              starts) kill Redis and start an empty one on its port 2 s later: the
              router routes on its last view meanwhile, the workers register again
     and `cancel` makes a quarter of the clients hang up at a random point.
Then every live worker must be back to all blocks free. Printed: requests, faults by kind,
resumes by reason, completed token-exact vs the reference, mismatched, failed, cancelled,
rejected for lack of room (RESOURCE_EXHAUSTED: a clear answer, not a loss),
the pause a resumed stream saw (its longest gap between two chunks) p50/p99, leaked
blocks. Exit status 1 when a request was lost or wrong, or a block leaked.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from splitserve.bench.procs import free_port, spawn, wait_for_workers
from splitserve.client import Client, SplitServeError
from splitserve.v1 import worker_pb2, worker_pb2_grpc

FAULTS = ("kill", "term", "stop", "pkill", "redis", "cancel")
DEFAULT_FAULTS = ("kill", "term", "stop", "pkill", "cancel")


@dataclass
class Outcome:
    """One request of one pass."""

    tokens: list[int] = field(default_factory=list)
    finish_reason: str = ""
    error: str = ""
    cancelled: bool = False
    num_resumes: int = 0
    longest_gap_s: float = 0.0


@dataclass
class Cluster:
    """The processes of the deployment; workers can be signalled and restarted."""

    model: str
    procs: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    fields: dict[str, list[str]] = field(default_factory=dict)
    worker_args: list[str] = field(default_factory=list)
    kv_migration: bool = True  # a drained decode worker ships its requests' KV
    redis_port: int | None = None  # cluster state in a redis-server on this port
    redis: subprocess.Popen[bytes] | None = None
    redis_dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def cluster_url(self) -> str:
        if self.redis_port is not None:
            return f"redis://127.0.0.1:{self.redis_port}/0"
        return self.fields["router"][4]

    @property
    def router(self) -> str:
        return self.fields["router"][2]

    @property
    def metrics_url(self) -> str:
        return f"http://{self.fields['router'][6]}/metrics"

    def start(self, max_resumes: int) -> None:
        redis_args: list[str] = []
        if self.redis_port is not None:
            self.start_redis()
            redis_args = ["--redis-url", self.cluster_url]
        self._spawn("router", ["router", "--model", self.model, "--port", "0", "--http-port",
                               "0", "--local-prefill-threshold", "32",
                               "--max-resumes", str(max_resumes), *redis_args])
        # Each worker hosts its own KV rendezvous store: a killed worker takes only its own.
        self.worker_args = ["--model", self.model, "--cluster", self.cluster_url,
                            "--kv-timeout", "3",
                            "--heartbeat-ttl", "2", "--threads", "1", "--num-kv-blocks", "512",
                            "--drain-timeout", "20"]
        for name in ("prefill-0", "decode-0", "decode-1"):
            self.start_worker(name)
        self.wait_for_workers()

    def wait_for_workers(self) -> None:
        url = self.cluster_url if self.redis_port is not None else None
        wait_for_workers(self.router, 3, cluster_url=url)

    def start_redis(self) -> None:
        """A fresh, empty redis-server (no persistence) on redis_port."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("the redis fault needs redis-server (make setup installs it)")
        workdir = self.redis_dir
        if workdir is None:
            workdir = self.redis_dir = tempfile.TemporaryDirectory(prefix="splitserve-redis-")
        self.redis = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(self.redis_port), "--save", "",
             "--appendonly", "no", "--dir", workdir.name],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.redis_port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.redis.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def start_worker(self, name: str) -> None:
        role = name.split("-")[0]
        extra = ["--no-kv-migration"] if role == "decode" and not self.kv_migration else []
        self._spawn(name, [role, *self.worker_args, "--worker-id", name, *extra])

    def _spawn(self, name: str, args: list[str]) -> None:
        proc, words = spawn(args, timeout_s=300)
        self.procs[name], self.fields[name] = proc, words

    def worker_addresses(self) -> dict[str, str]:
        return {name: words[3] for name, words in self.fields.items()
                if name.startswith(("prefill", "decode")) and self.procs[name].poll() is None}

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.redis is not None:
            self.redis.kill()
            self.redis.wait(10)
        if self.redis_dir is not None:
            self.redis_dir.cleanup()


def _requests(n: int, max_tokens: int, seed: int) -> list[tuple[list[int], dict[str, Any]]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.choice([6, 20, 60, 150, 300])
        prompt = [rng.randrange(100, 40000) for _ in range(length)]
        sampling: dict[str, Any] = {"max_tokens": max_tokens, "ignore_eos": True}
        if i % 4 == 3:
            sampling.update(temperature=0.8, top_k=40, seed=seed * 1000 + i)
        else:
            sampling.update(temperature=0.0)
        out.append((prompt, sampling))
    return out


@dataclass
class Progress:
    """Sets `streaming` once `needed` streams have their first token (faults wait for it:
    a fault before any stream runs tests nothing)."""

    needed: int
    started: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    streaming: threading.Event = field(default_factory=threading.Event)

    def first_token(self) -> None:
        with self.lock:
            self.started += 1
            if self.started >= self.needed:
                self.streaming.set()


def _run_one(router: str, prompt: list[int], sampling: dict[str, Any],
             cancel_after: int | None, progress: Progress | None) -> Outcome:
    out = Outcome()
    last: float | None = None
    try:
        with Client(router, timeout=300, max_retries=0) as client:
            stream = client.stream(prompt, **sampling)
            for chunk in stream:
                now = time.monotonic()
                if last is not None:
                    out.longest_gap_s = max(out.longest_gap_s, now - last)
                last = now
                if progress is not None and not out.tokens and chunk.token_ids:
                    progress.first_token()
                out.tokens.extend(chunk.token_ids)
                if cancel_after is not None and len(out.tokens) >= cancel_after:
                    stream.close()
                    out.cancelled = True
                    return out
                if chunk.finish_reason:
                    out.finish_reason = chunk.finish_reason
                    out.error = chunk.error_message
                    out.num_resumes = chunk.timings.num_resumes if chunk.timings else 0
    except SplitServeError as exc:
        out.error = f"{exc.code.name if exc.code is not None else 'UNKNOWN'}: {exc}"
    return out


def _pass(cluster: Cluster, requests: list[tuple[list[int], dict[str, Any]]], concurrency: int,
          cancels: dict[int, int], progress: Progress | None = None) -> list[Outcome]:
    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(_run_one, cluster.router, p, s, cancels.get(i), progress)
                   for i, (p, s) in enumerate(requests)]
        return [f.result() for f in futures]


def _inject(cluster: Cluster, faults: list[str], stop: threading.Event, rng: random.Random,
            log: list[dict[str, Any]], max_faults: int, progress: Progress) -> None:
    """One fault at a time, a random 1-3 s apart once streams run, until `stop` or
    `max_faults`."""
    kinds = [f for f in faults if f != "cancel"]
    while not progress.streaming.wait(0.1):
        if stop.is_set():
            return
    while kinds and len(log) < max_faults and not stop.wait(rng.uniform(1.0, 3.0)):
        kind = rng.choice(kinds)
        at = time.monotonic()
        if kind == "stop":
            proc = cluster.procs["prefill-0"]
            proc.send_signal(signal.SIGSTOP)
            stop.wait(3.0)
            proc.send_signal(signal.SIGCONT)
            log.append({"fault": "stop", "worker": "prefill-0", "at": at})
            continue
        if kind == "redis":
            assert cluster.redis is not None
            cluster.redis.kill()
            cluster.redis.wait(10)
            log.append({"fault": "redis", "worker": "redis", "at": at})
            time.sleep(2.0)
            cluster.start_redis()  # empty: the workers register again on their heartbeat
            cluster.wait_for_workers()
            continue
        name = "prefill-0" if kind == "pkill" else rng.choice(["decode-0", "decode-1"])
        proc = cluster.procs[name]
        proc.send_signal(signal.SIGTERM if kind == "term" else signal.SIGKILL)
        proc.wait(60)
        log.append({"fault": kind, "worker": name, "at": at})
        time.sleep(1.0)
        cluster.start_worker(name)
        cluster.wait_for_workers()


def _leaked_blocks(cluster: Cluster, timeout_s: float = 5.0) -> tuple[dict[str, int], float]:
    """Blocks still held per live worker once they settled (at most `timeout_s`), and the
    seconds that took."""
    start = time.monotonic()
    deadline = start + timeout_s
    while True:
        held = {}
        for name, address in cluster.worker_addresses().items():
            with grpc.insecure_channel(address) as channel:
                if name.startswith("decode"):
                    load = worker_pb2_grpc.DecodeWorkerStub(channel).Stats(
                        worker_pb2.DecodeStatsRequest(), timeout=10).load
                else:
                    load = worker_pb2_grpc.PrefillWorkerStub(channel).Stats(
                        worker_pb2.PrefillStatsRequest(), timeout=10).load
            held[name] = load.num_total_blocks - load.num_free_blocks
        if not any(held.values()) or time.monotonic() > deadline:
            return held, time.monotonic() - start
        time.sleep(0.2)


def _resumes(cluster: Cluster) -> dict[str, int]:
    text = urllib.request.urlopen(cluster.metrics_url, timeout=10).read().decode()
    found = re.findall(r'splitserve_request_resumes_total\{reason="(\w+)"\} ([\d.]+)', text)
    return {reason: int(float(n)) for reason, n in found}


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="splitserve bench chaos")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--num-requests", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--faults", default=",".join(DEFAULT_FAULTS),
                    help=f"some of {','.join(FAULTS)}")
    ap.add_argument("--cancel-fraction", type=float, default=0.25,
                    help="with the cancel fault: the share of clients that hang up")
    ap.add_argument("--skip-reference", action="store_true",
                    help="no reference pass (with --cancel-fraction 1: a pure cancel storm)")
    ap.add_argument("--max-faults", type=int, default=1000, help="stop injecting after these")
    ap.add_argument("--max-resumes", type=int, default=4, help="the router's --max-resumes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-kv-migration", action="store_true",
                    help="drained decode workers hand requests on for recompute, not their KV")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    faults = [f for f in args.faults.split(",") if f]
    unknown = set(faults) - set(FAULTS)
    if unknown:
        ap.error(f"unknown faults {sorted(unknown)}; choose from {FAULTS}")
    rng = random.Random(args.seed)
    requests = _requests(args.num_requests, args.max_tokens, args.seed)
    cancels = ({i: rng.randrange(0, args.max_tokens) for i in range(len(requests))
                if rng.random() < args.cancel_fraction} if "cancel" in faults else {})
    cluster = Cluster(args.model, kv_migration=not args.no_kv_migration,
                      redis_port=free_port() if "redis" in faults else None)
    try:
        cluster.start(args.max_resumes)
        if not args.skip_reference:
            print(f"reference pass: {len(requests)} requests, concurrency {args.concurrency}",
                  flush=True)
        reference = ([Outcome(finish_reason="length")] * len(requests) if args.skip_reference
                     else _pass(cluster, requests, args.concurrency, {}))
        print(f"chaos pass: faults {faults}", flush=True)
        before = _resumes(cluster)
        stop = threading.Event()
        log: list[dict[str, Any]] = []
        progress = Progress(needed=max(1, min(args.concurrency, len(requests)) // 2))
        injector = threading.Thread(
            target=_inject, args=(cluster, faults, stop, rng, log, args.max_faults, progress))
        started = time.monotonic()
        injector.start()
        try:
            chaos = _pass(cluster, requests, args.concurrency, cancels, progress)
        finally:
            stop.set()
            injector.join()
        took = time.monotonic() - started
        leaked, settle_s = _leaked_blocks(cluster)
        after = _resumes(cluster)
    finally:
        cluster.stop()
    resumes = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    bad_reference = [i for i, o in enumerate(reference) if o.finish_reason != "length"]
    exact = mismatched = failed = cancelled = rejected = 0
    failures: list[str] = []
    for i, (ref, got) in enumerate(zip(reference, chaos, strict=True)):
        if got.cancelled:
            cancelled += 1
        elif got.finish_reason == "length" and (args.skip_reference or got.tokens == ref.tokens):
            exact += 1
        elif got.finish_reason == "length":
            mismatched += 1
            failures.append(f"request {i}: tokens differ from the reference")
        elif got.error.startswith("RESOURCE_EXHAUSTED"):
            rejected += 1  # refused at once for lack of room: a clear answer, not a loss
        else:
            failed += 1
            failures.append(f"request {i}: {got.finish_reason or 'status'} {got.error}")
    pauses = [o.longest_gap_s for o in chaos if o.num_resumes and not o.cancelled]
    figures: dict[str, Any] = {
        "model": args.model, "requests": len(requests), "concurrency": args.concurrency,
        "max_resumes": args.max_resumes,
        "max_tokens": args.max_tokens, "seconds": round(took, 1),
        "faults": {k: sum(1 for e in log if e["fault"] == k) for k in FAULTS if k != "cancel"},
        "cancelled_by_client": cancelled, "resumes": resumes,
        "resumed_requests": sum(1 for o in chaos if o.num_resumes),
        "exact": exact, "mismatched": mismatched, "failed": failed,
        "rejected_no_room": rejected,
        "exactness_checked": not args.skip_reference,
        "resume_pause_ms": {"p50": round(1000 * _percentile(pauses, 0.5)),
                            "p99": round(1000 * _percentile(pauses, 0.99)),
                            "max": round(1000 * max(pauses, default=0.0))},
        "leaked_blocks": leaked, "blocks_settled_s": round(settle_s, 2),
        "reference_failures": len(bad_reference),
        "failures": failures[:20], "fault_log": log,
    }
    for key in ("requests", "max_resumes", "faults", "cancelled_by_client", "resumes", "resumed_requests",
                "exact", "mismatched", "failed", "rejected_no_room", "resume_pause_ms", "leaked_blocks", "blocks_settled_s", "seconds"):
        print(f"{key:20s} {json.dumps(figures[key])}")
    for line in failures[:20]:
        print("  " + line)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(figures, indent=2))
    ok = not (mismatched or failed or bad_reference or any(leaked.values()))
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1

