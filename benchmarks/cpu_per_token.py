"""CPU time per streamed token of every process of a served run (a lone stream by default),
and its busiest threads: what the serving path (client, router, the decode worker's relay)
costs beside the engine's own step.

    PYTHONPATH=. .venv/bin/python benchmarks/cpu_per_token.py [--dtype bfloat16]
        [--threads 2] [--requests 8] [--output-len 128] [--concurrency 1] [--api grpc|http]

A router and one decode worker (prefilling its own prompts) as processes on 127.0.0.1,
`splitserve bench serve` at --concurrency (256 words in, --output-len tokens out, EOS
ignored; `--api`: through the SDK over gRPC, or the OpenAI HTTP API with SSE), after a
warm-up of 2 requests (or --concurrency, if more). CPU time and context switches
(voluntary: the thread waited; involuntary: it was preempted) are read from /proc for
every thread before and after the run. The client's CPU is that of its process (a waited
child) less the warm-up's, over the tokens the run has beyond the warm-up's: a `bench
serve` process costs ~0.4 s of CPU besides its tokens (its start, imports and the
workload's tokenizer), which the first version of this script counted per token (a third
of the client's figure at 8 requests). The engine threads spin between parallel regions,
so their CPU time is wall time, not work; their involuntary switches are the times the
serving path's threads took their core.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from engine_args import engine_parser

from splitserve.bench.procs import local_deployment

TICK = os.sysconf("SC_CLK_TCK")


class ThreadTimes(NamedTuple):
    name: str
    cpu_s: float  # CPU seconds so far
    switches: int  # context switches so far, voluntary (it waited) and not (preempted)


def thread_cpu_s(pid: int) -> dict[int, ThreadTimes]:
    """tid -> its ThreadTimes, for every thread of `pid`."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            status = (task / "status").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        switches = sum(int(value) for key, _, value in map(lambda line: line.partition(":"),
                                                             status.splitlines())
                       if key.endswith("ctxt_switches"))
        out[int(task.name)] = ThreadTimes(name, (int(fields[11]) + int(fields[12])) / TICK,
                                          switches)
    return out


def deployment_processes() -> dict[int, str]:
    """pid -> role of this process's `splitserve.cli` children."""
    me, found = os.getpid(), {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if ppid == me and b"splitserve.cli" in argv:
            found[int(proc.name)] = argv[argv.index(b"splitserve.cli") + 1].decode()
    return found


def client_cpu_s(argv: list[str]) -> float:
    """CPU seconds of the child process `argv` (run to its end)."""
    before = os.times()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = os.times()
    return (after.children_user + after.children_system
            - before.children_user - before.children_system)


def main() -> int:
    ap = engine_parser(__doc__)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--api", choices=("grpc", "http"), default="grpc",
                    help="the client's way in: the SDK over gRPC or the OpenAI HTTP API")
    args = ap.parse_args()
    warmup = max(2, args.concurrency)
    if args.requests <= warmup:
        ap.error(f"--requests must exceed the warm-up's {warmup} requests")
    worker_args = ("--dtype", args.dtype, "--max-num-seqs", "16", "--num-kv-blocks", "2048")
    with tempfile.TemporaryDirectory() as tmp, local_deployment(
            args.model, num_prefill=0, num_decode=1, local_prefill_threshold=1 << 20,
            threads=args.threads, worker_args=worker_args) as addrs:
        result = Path(tmp) / "serve.json"
        target = (f"grpc://{addrs['router']}" if args.api == "grpc"
                  else f"http://{addrs['http']}")

        def bench(num_requests: int) -> list[str]:
            return [sys.executable, "-m", "splitserve.cli", "bench", "serve", "--target",
                    target, "--workload", "fixed", "--input-len", "256",
                    "--output-len", str(args.output_len), "--concurrency", str(args.concurrency),
                    "--num-requests", str(num_requests), "--no-progress", "--out", str(result)]

        warmup_s = client_cpu_s(bench(warmup))
        procs = deployment_processes()
        before = {pid: thread_cpu_s(pid) for pid in procs}
        start = time.monotonic()
        client_s = client_cpu_s(bench(args.requests)) - warmup_s
        wall = time.monotonic() - start
        after = {pid: thread_cpu_s(pid) for pid in procs}
        summary = json.loads(result.read_text())["summary"]
    tokens = args.requests * args.output_len
    cores = os.cpu_count() or 1
    print(f"{tokens} tokens in {wall:.1f} s at concurrency {args.concurrency}, TPOT p50 "
          f"{summary['tpot_ms']['p50']:.2f} ms; the {cores} cores' time: "
          f"{cores * wall * 1e3 / tokens:.3f} ms per token")
    client_tokens = (args.requests - warmup) * args.output_len
    print(f"client (bench serve): {client_s * 1e3 / client_tokens:.3f} ms CPU per token "
          f"(beyond its {warmup}-request warm-up's)")
    for pid, role in procs.items():
        zero = ThreadTimes("", 0.0, 0)
        rows = sorted(((t.cpu_s - before[pid].get(tid, zero).cpu_s,
                        t.switches - before[pid].get(tid, zero).switches, tid, t.name)
                       for tid, t in after[pid].items()), reverse=True)
        print(f"{role} (pid {pid}): {sum(r[0] for r in rows) * 1e3 / tokens:.3f} ms CPU and "
              f"{sum(r[1] for r in rows) / tokens:.1f} context switches per token")
        for cpu_s, switches, tid, name in rows[:8]:
            if cpu_s > 0 or switches > tokens / 10:
                print(f"    thread {tid} {name}: {cpu_s * 1e3 / tokens:.3f} ms, "
                      f"{switches / tokens:.1f} switches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
