"""One deployment on test hosts (bench.netns) that the multi-host modules share, so the hosts
and processes are built once: the router, a prefill worker, a decode worker and a client,
each on its own host, joined by a bridge."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitserve.bench import netns
from splitserve.bench.procs import spawn
from tests.multihost._deployment import (
    KV_TIMEOUT_S,
    METRICS_PORT,
    PORT,
    PREFILL_TIMEOUT_MS,
)


@pytest.fixture(scope="package")
def cluster(tiny_llama: Path) -> Iterator[netns.TestHosts]:
    with netns.TestHosts(["router", "prefill", "decode", "client"]) as hosts:
        router_addr = hosts.address("router")
        common = ["--model", str(tiny_llama), "--block-size", "8"]
        procs = []
        try:
            procs.append(spawn(["router", *common, "--host", router_addr, "--port", str(PORT),
                                "--http-port", "8000", "--local-prefill-threshold", "8",
                                "--prefill-timeout-ms", str(PREFILL_TIMEOUT_MS)],
                               prefix=tuple(hosts.command("router", [])))[0])
            for role in ("decode", "prefill"):
                procs.append(spawn(
                    [role, *common, "--host", hosts.address(role), "--num-kv-blocks", "64",
                     "--cluster", f"grpc://{router_addr}:{PORT}", "--kv-timeout",
                     str(KV_TIMEOUT_S[role]), "--lease-timeout", "4", "--heartbeat-ttl", "3",
                     "--metrics-port", str(METRICS_PORT)],
                    # gloo's address: the interface named (prefill), or --host (decode)
                    env_set={"GLOO_SOCKET_IFNAME": netns.IFNAME} if role == "prefill" else {},
                    prefix=tuple(hosts.command(role, [])))[0])
            yield hosts
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
