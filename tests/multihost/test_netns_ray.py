"""`splitserve serve` over a real Ray cluster of three test hosts (issue 11): a Ray head on
host "head", Ray worker nodes on hosts "prefill" and "decode" (`ray start --address`, each
offering one custom resource), all with Ray's token authentication on. The driver runs on
the head host and places the prefill actor by the `prefill` resource and the decode actor
by `decode`, so the KV crosses the bridge between two Ray nodes. Greedy tokens equal the
colocated engine's; every SplitServe listener binds its host's address; a Ray client
without the cluster's token is refused."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from splitserve.bench import netns

WHY_NOT = netns.available()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")

PORT = 50051
GCS_PORT = 6379
# Ray's per-process gRPC servers (every actor's and the driver's core worker) take ports from
# this range and bind every interface; pinned so they can be told from SplitServe's own.
RAY_WORKER_PORTS = (20000, 20099)
GREEDY = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
PROMPTS = [list(range(100, 160)), list(range(200, 290)), [5, 6, 7]]  # remote, remote, local
BIN = Path(sys.executable).parent  # the `ray` of this venv

CLIENT = textwrap.dedent("""
    import json, sys, time
    from splitserve.client import Client
    from splitserve.cluster.remote import RemoteClusterStore
    address, cluster_token, prompts, greedy = sys.argv[1], sys.argv[2], *map(json.loads, sys.argv[3:5])
    store = RemoteClusterStore(address, token=cluster_token)
    deadline = time.monotonic() + 60
    while len(workers := store.live_workers()) < 2:
        assert time.monotonic() < deadline, "workers did not register"
        time.sleep(0.2)
    out = {"workers": {info.role.value: info.address for info, _ in workers}, "results": []}
    with Client(address, timeout=60, max_retries=0) as client:
        for prompt in prompts:
            c = client.generate(prompt, **greedy)
            out["results"].append({"tokens": c.token_ids, "local": c.timings.prefill_local,
                                   "prefill": c.timings.prefill_worker_id,
                                   "decode": c.timings.decode_worker_id})
    print(json.dumps(out))
""")

# Joins the cluster as a Ray driver with whatever token its environment holds; prints the
# authentication mode and every live node's address and custom resources.
RAY_PROBE = textwrap.dedent("""
    import json, sys, time
    import ray
    from ray._raylet import AuthenticationMode, get_authentication_mode
    ray.init(address=sys.argv[1], log_to_driver=False)
    deadline = time.monotonic() + 60
    while len(nodes := [n for n in ray.nodes() if n["Alive"]]) < 3:
        assert time.monotonic() < deadline, nodes
        time.sleep(0.2)
    print(json.dumps({
        "token_auth": get_authentication_mode() == AuthenticationMode.TOKEN,
        "nodes": {n["NodeManagerAddress"]: sorted(k for k in n["Resources"]
                                                  if k in ("prefill", "decode")) for n in nodes},
    }))
""")


@dataclass
class RayCluster:
    hosts: netns.TestHosts
    ray_env: dict[str, str]  # RAY_AUTH_MODE=token and the cluster's RAY_AUTH_TOKEN
    cluster_token: str  # SplitServe's own cluster token (cluster state, KV handshakes)
    router: str  # host:port of the router's gRPC endpoint
    driver_pid: int

    @property
    def gcs(self) -> str:
        return f"{self.hosts.address('head')}:{GCS_PORT}"

    def python(self, host: str, code: str, *args: str, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess[str]:
        argv = self.hosts.command(host, [sys.executable, "-c", code, *args])
        return subprocess.run(argv, capture_output=True, text=True, timeout=120,
                              env=env if env is not None else self.ray_env)


def _wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def _node_logs(temp_root: str) -> str:
    """The tails of the worker nodes' `ray start` output: why a node did not join."""
    tails = []
    for host in ("prefill", "decode"):
        path = Path(temp_root, f"{host}.log")
        text = path.read_text(errors="replace") if path.exists() else "(no log)"
        tails.append(f"\n--- ray start on {host}:\n{text[-1500:]}")
    return "".join(tails)


def _ray_start(hosts: netns.TestHosts, host: str, temp_root: str, env: dict[str, str],
               *args: str) -> subprocess.Popen[bytes]:
    """`ray start --block` inside `host`; SIGTERM stops it and every process it started."""
    argv = [str(BIN / "ray"), "start", "--block", "--node-ip-address", hosts.address(host),
            "--num-cpus", "1", "--object-store-memory", str(100 << 20),
            "--min-worker-port", str(RAY_WORKER_PORTS[0]),
            "--max-worker-port", str(RAY_WORKER_PORTS[1]),
            "--temp-dir", os.path.join(temp_root, host), *args]
    with open(os.path.join(temp_root, f"{host}.log"), "wb") as log:
        return subprocess.Popen(hosts.command(host, argv), env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _stop(procs: list[subprocess.Popen[bytes]], timeout_s: float) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def ray_cluster(tiny_llama: Path) -> Iterator[RayCluster]:
    # Short: Ray's unix sockets live under the temp dir (a 107-byte path limit).
    temp_root = tempfile.mkdtemp(prefix="ssray-", dir="/tmp")
    # None of this process's RAY_* variables: a ray.init in it can leave some behind
    # (launcher.stop_ray puts back what a local head's start set; a plain ray.init's stay),
    # and with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 among them `ray start --address` refused
    # to join ("Multi-node Ray clusters are not supported on Windows and OSX").
    ray_env = {name: value for name, value in os.environ.items()
               if not name.startswith("RAY_")}
    ray_env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    cluster_token = secrets.token_urlsafe(32)
    ray_nodes: list[subprocess.Popen[bytes]] = []
    driver: subprocess.Popen[bytes] | None = None
    with netns.TestHosts(["head", "prefill", "decode"]) as hosts:
        try:
            head = hosts.address("head")
            ray_nodes.append(_ray_start(hosts, "head", temp_root, ray_env, "--head",
                                        "--port", str(GCS_PORT), "--include-dashboard", "false"))
            _wait_for(lambda: any(a.endswith(f":{GCS_PORT}") for a in hosts.listeners("head")),
                      60, "the Ray head did not start")
            for role in ("prefill", "decode"):
                ray_nodes.append(_ray_start(hosts, role, temp_root, ray_env,
                                            "--address", f"{head}:{GCS_PORT}",
                                            "--resources", json.dumps({role: 1})))
            probe = subprocess.run(hosts.command("head", [sys.executable, "-c", RAY_PROBE,
                                                          f"{head}:{GCS_PORT}"]),
                                   capture_output=True, text=True, timeout=120, env=ray_env)
            assert probe.returncode == 0, probe.stderr[-3000:] + _node_logs(temp_root)
            serve_log = Path(temp_root, "serve.log")
            with serve_log.open("wb") as log:
                driver = subprocess.Popen(
                    hosts.command("head", [
                        sys.executable, "-m", "splitserve.cli", "serve",
                        "--model", str(tiny_llama), "--ray-address", f"{head}:{GCS_PORT}",
                        "--prefill-resource", "prefill", "--decode-resource", "decode",
                        "--port", str(PORT), "--http-port", "8000", "--block-size", "8",
                        "--num-kv-blocks", "64", "--threads", "1",
                        "--local-prefill-threshold", "8"]),
                    env={**ray_env, "SPLITSERVE_CLUSTER_TOKEN": cluster_token},
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            _wait_for(lambda: "SplitServe ready at" in serve_log.read_text()
                      or driver.poll() is not None, 120, "splitserve serve did not start")
            text = serve_log.read_text()
            assert "SplitServe ready at" in text, text[-3000:]
            router = text.split("SplitServe ready at ", 1)[1].split()[0]
            yield RayCluster(hosts, ray_env, cluster_token, router, driver.pid)
        finally:
            if driver is not None:  # drains, then stops the actors
                _stop([driver], 30)
            # `ray start --block` stops its node's processes on SIGTERM; the hosts' close
            # kills whatever is left inside them (`ray stop` would stop every Ray on this
            # machine, not only these hosts').
            _stop(ray_nodes, 30)
            shutil.rmtree(temp_root, ignore_errors=True)


def generate(cluster: RayCluster, prompts: list[list[int]]) -> dict[str, object]:
    result = cluster.python("head", CLIENT, cluster.router, cluster.cluster_token,
                            json.dumps(prompts), json.dumps(GREEDY))
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def expected(model: Path, prompts: list[list[int]]) -> list[list[int]]:
    from splitserve import LLM, SamplingParams

    llm = LLM(model=str(model), block_size=8)
    return [o.token_ids for o in llm.generate(prompts, SamplingParams(**GREEDY))]


def test_actors_on_their_nodes_and_greedy_tokens_equal_the_colocated_engine(
        ray_cluster: RayCluster, tiny_llama: Path) -> None:
    hosts = ray_cluster.hosts
    out = generate(ray_cluster, PROMPTS)
    results: list[dict[str, object]] = out["results"]  # type: ignore[assignment]
    assert [r["tokens"] for r in results] == expected(tiny_llama, PROMPTS), results
    assert [r["local"] for r in results] == [False, False, True]  # KV crossed the bridge
    assert results[0]["prefill"] == "prefill-0" and results[0]["decode"] == "decode-0"
    workers: dict[str, str] = out["workers"]  # type: ignore[assignment]
    for role in ("prefill", "decode"):  # advertised on its own node and listening there
        assert workers[role].rpartition(":")[0] == hosts.address(role), workers
        assert workers[role] in hosts.listeners(role), (role, hosts.listeners(role))
    router_host = next(h for h in hosts.names if ray_cluster.router in hosts.listeners(h))
    print(f"router on {router_host}, workers {workers}")


def _splitserve_listeners(cluster: RayCluster, host: str) -> list[str]:
    """Listeners inside `host` of the processes that run SplitServe code (the driver and
    the actors), less the ports of Ray's own per-process gRPC servers."""
    out = cluster.hosts.run(host, ["ss", "-Htlnp"]).stdout.splitlines()
    ours = [line for line in out if f"pid={cluster.driver_pid}," in line
            or '(("ray::_RouterAct' in line or '(("ray::_WorkerAct' in line]
    found = []
    for line in ours:
        address = line.split()[3]
        port = int(address.rpartition(":")[2])
        if not RAY_WORKER_PORTS[0] <= port <= RAY_WORKER_PORTS[1]:
            found.append(address.replace("[::ffff:", "").replace("]:", ":"))
    return found


def test_every_splitserve_listener_binds_its_hosts_address(ray_cluster: RayCluster) -> None:
    generate(ray_cluster, PROMPTS[:1])  # KV pairs (gloo) are up
    hosts = ray_cluster.hosts
    seen = {}
    for host in hosts.names:
        listeners = _splitserve_listeners(ray_cluster, host)
        own = f"{hosts.address(host)}:"
        assert all(addr.startswith(own) for addr in listeners), (host, listeners)
        seen[host] = listeners
    # the KV rendezvous store on the driver's host, a gRPC server on each worker's
    assert seen["head"] and seen["prefill"] and seen["decode"], seen


def test_ray_token_authentication_is_on(ray_cluster: RayCluster) -> None:
    probe = ray_cluster.python("head", RAY_PROBE, ray_cluster.gcs)
    assert probe.returncode == 0, probe.stderr[-3000:]
    state = json.loads(probe.stdout.strip().splitlines()[-1])
    hosts = ray_cluster.hosts
    assert state["token_auth"] is True
    assert state["nodes"] == {hosts.address("head"): [], hosts.address("prefill"): ["prefill"],
                              hosts.address("decode"): ["decode"]}
    # (a refused driver retries its GCS connection once a second; two tries will do)
    retries = {**ray_cluster.ray_env, "RAY_gcs_server_port_wait_time_s": "2"}
    no_token = {k: v for k, v in retries.items() if not k.startswith("RAY_AUTH")}
    wrong_token = {**retries, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    for env in (no_token, wrong_token):
        refused = ray_cluster.python("head", RAY_PROBE, ray_cluster.gcs, env=env)
        assert refused.returncode != 0
        assert "Authentication token is missing or incorrect" in refused.stderr, \
            refused.stderr[-3000:]

