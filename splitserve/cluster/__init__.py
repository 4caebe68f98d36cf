"""Cluster state shared by the router and the workers (torch-free).

`open_store(url)` picks the backend from a URL:

    None or "memory"         InMemoryClusterStore (this process only)
    "redis://..."            RedisClusterStore ("rediss://" and "unix://" too)
    "grpc://host:port"       RemoteClusterStore, talking to a ClusterState server

The Redis and gRPC backends are imported only when asked for.
"""

from __future__ import annotations

from splitserve.cluster.memory import InMemoryClusterStore
from splitserve.cluster.store import (
    ClusterStore,
    LiveWorker,
    RequestLedgerEntry,
    RequestPhase,
    WorkerInfo,
    WorkerLoadReport,
    WorkerRole,
)

__all__ = [
    "ClusterStore",
    "InMemoryClusterStore",
    "LiveWorker",
    "RequestLedgerEntry",
    "RequestPhase",
    "WorkerInfo",
    "WorkerLoadReport",
    "WorkerRole",
    "open_store",
]

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
_GRPC_SCHEME = "grpc://"


def open_store(url: str | None = None, *, namespace: str = "splitserve:",
               token: str | None = None) -> ClusterStore:
    """Open the cluster store named by `url` (see the module docstring).

    `namespace` prefixes every Redis key; `token` is the deployment's cluster token, sent to
    a gRPC ClusterState server (Redis takes its password in the URL); other backends ignore
    both.
    """
    if url is None or url == "memory":
        return InMemoryClusterStore()
    if url.startswith(_REDIS_SCHEMES):
        from splitserve.cluster.redis_store import RedisClusterStore

        return RedisClusterStore(url, namespace=namespace)
    if url.startswith(_GRPC_SCHEME):
        address = url[len(_GRPC_SCHEME) :].rstrip("/")
        if not address:
            raise ValueError(f"cluster store URL {url!r} lacks host:port")
        from splitserve.cluster.remote import RemoteClusterStore

        return RemoteClusterStore(address, token=token)
    raise ValueError(
        f"unknown cluster store URL {url!r}: expected None, 'memory', 'redis://...' "
        "or 'grpc://host:port'"
    )
