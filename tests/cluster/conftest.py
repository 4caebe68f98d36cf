"""Fixtures for the cluster-state tests: a real redis-server, and one store per backend."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from splitserve.cluster.store import ClusterStore


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_redis(binary: str, port: int, workdir: str) -> subprocess.Popen[bytes]:
    import redis

    proc = subprocess.Popen(
        [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
    deadline = time.monotonic() + 10.0
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise OSError(f"redis-server exited with {proc.returncode} on port {port}")
            try:
                if client.ping():
                    return proc
            except redis.ConnectionError:
                time.sleep(0.05)
        raise TimeoutError(f"redis-server on port {port} did not answer PING within 10 s")
    except BaseException:
        proc.kill()
        proc.wait(timeout=5)
        raise
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a throwaway redis-server on a free loopback port, for the whole session."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    last_error: Exception | None = None
    for _ in range(3):  # the free port may be taken between the probe and the bind
        port = _free_port()
        try:
            proc = _start_redis(binary, port, str(tmp_path_factory.mktemp("redis")))
        except OSError as exc:
            last_error = exc
            continue
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        return
    raise RuntimeError(f"could not start redis-server: {last_error}")


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Backend:
    """A store under test and a way to let time pass for its TTLs."""

    name: str
    store: ClusterStore
    advance: Callable[[float], None]


@pytest.fixture(params=["memory", "redis", "remote"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    from splitserve.cluster.memory import InMemoryClusterStore

    if request.param == "memory":
        clock = FakeClock()
        yield Backend("memory", InMemoryClusterStore(clock=clock), clock.advance)
    elif request.param == "redis":
        from splitserve.cluster.redis_store import RedisClusterStore

        url = request.getfixturevalue("redis_url")
        namespace = f"test-{uuid.uuid4().hex[:8]}:"
        redis_store = RedisClusterStore(url, namespace=namespace)
        try:
            yield Backend("redis", redis_store, time.sleep)  # Redis expires keys in real time
        finally:
            _delete_namespace(url, namespace)
            redis_store.close()
    else:
        from splitserve.cluster.remote import RemoteClusterStore, start_cluster_state_server

        clock = FakeClock()
        server, port = start_cluster_state_server(InMemoryClusterStore(clock=clock))
        remote_store = RemoteClusterStore(f"127.0.0.1:{port}")
        try:
            yield Backend("remote", remote_store, clock.advance)
        finally:
            remote_store.close()
            server.stop(grace=None)


def _delete_namespace(url: str, namespace: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{namespace}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
