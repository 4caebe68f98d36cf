"""Local deployments for benchmarks: the components as plain processes on 127.0.0.1."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def spawn(args: list[str], timeout_s: float = 300.0, *, log_dir: Path | None = None,
          name: str = "", env_drop: tuple[str, ...] = (), env_set: dict[str, str] | None = None,
          prefix: tuple[str, ...] = ()) -> tuple[subprocess.Popen[str], list[str]]:
    """Start `splitserve ARGS` and wait for its READY line (returned split into words).

    Output goes nowhere, or with `log_dir` to LOG_DIR/NAME.out and NAME.err (kept for the
    caller to read). `env_drop`: variables the process must not inherit; `env_set`: ones it
    gets. `prefix`: argv that runs the command (e.g. `ip netns exec NS`, see bench.netns).
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env_set or {})}
    for var in env_drop:
        env.pop(var, None)
    command = [*prefix, sys.executable, "-m", "splitserve.cli", *args]
    if log_dir is None:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout is not None
        stdout = proc.stdout

        def read_line() -> str:
            return stdout.readline()
    else:
        out_path = log_dir / f"{name or args[0]}.out"
        with out_path.open("w") as out, out_path.with_suffix(".err").open("w") as err:
            proc = subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True)
        consumed = 0

        def read_line() -> str:  # the next complete line of the file, or "" for now
            nonlocal consumed
            lines = out_path.read_text(errors="replace").splitlines(keepends=True)
            if consumed < len(lines) and lines[consumed].endswith("\n"):
                consumed += 1
                return lines[consumed - 1]
            time.sleep(0.1)
            return ""

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = read_line()
        if line.startswith("READY"):
            return proc, line.split()
        if not line and proc.poll() is not None:
            break
    proc.kill()
    where = f"; see {log_dir / (name or args[0])}.err" if log_dir is not None else ""
    raise RuntimeError(f"splitserve {args[0]} failed to start{where}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_workers(router: str, count: int, timeout_s: float = 120.0,
                     cluster_url: str | None = None) -> None:
    """Until `count` workers are live: in the router's own cluster store, or in the one at
    `cluster_url` (Redis)."""
    from splitserve.cluster import open_store
    from splitserve.cluster.remote import RemoteClusterStore
    from splitserve.common import envs

    # The processes inherit this environment, SPLITSERVE_CLUSTER_TOKEN included.
    store = (open_store(cluster_url) if cluster_url
             else RemoteClusterStore(router, token=envs.cluster_token()))
    try:
        deadline = time.monotonic() + timeout_s
        while len(store.live_workers()) < count:
            if time.monotonic() > deadline:
                raise RuntimeError("workers did not register")
            time.sleep(0.2)
        # (a cluster store that is down raises here: the caller sees why)
    finally:
        store.close()


@contextmanager
def local_deployment(
    model: str,
    *,
    num_prefill: int,
    num_decode: int,
    local_prefill_threshold: int,
    threads: int = 1,
    worker_args: tuple[str, ...] = ("--no-prefix-caching", "--num-kv-blocks", "512"),
    router_args: tuple[str, ...] = (),
) -> Iterator[dict[str, Any]]:
    """Yields {"router": addr, "http": the router's HTTP addr, "decode": [addrs], "prefill":
    [addrs]}; stops everything after."""
    procs: list[subprocess.Popen[str]] = []
    try:
        router, fields = spawn(["router", "--model", model, "--port", "0", "--http-port", "0",
                                 "--local-prefill-threshold", str(local_prefill_threshold),
                                 *router_args])
        procs.append(router)
        common = ["--model", model, "--cluster", fields[4], "--threads", str(threads),
                  *worker_args]  # each worker hosts its own KV rendezvous store
        addrs: dict[str, Any] = {"router": fields[2], "http": fields[6], "decode": [],
                                 "prefill": []}
        for role, count in (("decode", num_decode), ("prefill", num_prefill)):
            for index in range(count):
                proc, wfields = spawn([role, *common, "--worker-id", f"{role}-{index}"])
                procs.append(proc)
                addrs[role].append(wfields[3])
        wait_for_workers(fields[2], num_prefill + num_decode)
        yield addrs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def add_single_worker_args(ap: argparse.ArgumentParser) -> None:
    """Options of `single_worker_deployment` (the benchmarks of router policies)."""
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2, help="the decode worker's CPU threads")
    ap.add_argument("--num-kv-blocks", type=int, default=1024)
    ap.add_argument("--max-inflight", type=int, default=4,
                    help="router slots: near the decode batch the machine sustains")
    ap.add_argument("--max-num-seqs", type=int, default=64,
                    help="the decode worker's batch limit (its engine queues the rest)")


@contextmanager
def single_worker_deployment(args: argparse.Namespace, router_args: tuple[str, ...] = (),
                             worker_args: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
    """A router and one decode worker that prefills its own prompts, as configured by
    add_single_worker_args; yields local_deployment's addresses."""
    with local_deployment(
            args.model, num_prefill=0, num_decode=1, local_prefill_threshold=1 << 20,
            threads=args.threads,
            worker_args=("--num-kv-blocks", str(args.num_kv_blocks), "--dtype", args.dtype,
                         "--max-num-seqs", str(args.max_num_seqs), *worker_args),
            router_args=("--max-inflight", str(args.max_inflight), *router_args)) as addrs:
        yield addrs
