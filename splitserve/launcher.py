"""`splitserve serve`: the router and the workers as Ray actors.

Ray stays at this edge: the actors below are thin wrappers that build the same plain
classes the `splitserve router|prefill|decode` processes run. This process (the driver)
hosts the KV rendezvous store, so it must live as long as the deployment.

On one machine (no ray_address) everything binds 127.0.0.1, Ray's head included.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from splitserve.common import envs
from splitserve.engine.config import EngineConfig
from splitserve.supervision import WorkerSupervisor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    engine: EngineConfig = field(default_factory=EngineConfig)
    prefill_workers: int = 1
    decode_workers: int = 1
    port: int = 50051
    http_port: int | None = 8000  # OpenAI-compatible API + /metrics; 0 ephemeral, None off
    redis_url: str | None = None
    ray_address: str | None = None  # None: start a local head on loopback
    prefill_resource: str | None = None  # custom Ray resource pinning prefill actors
    decode_resource: str | None = None
    router_options: dict[str, Any] = field(default_factory=dict)  # extra RouterConfig fields
    kv_timeout_s: float = 30.0
    # Workers accept WorkerControl.SwitchRole (worker.flip): the router's P:D control
    # (router_options["pd_control"]) moves them between the roles.
    flippable: bool = False
    stream_interval: int = 1  # decode workers send tokens this many at a time (WorkerOptions)
    # How often the driver checks its worker actors and replaces one whose engine failed or
    # whose process died (splitserve.supervision); 0: never.
    supervise_interval_s: float = 2.0

    def __post_init__(self) -> None:
        if self.prefill_workers < 0 or self.decode_workers < 1:
            raise ValueError("need >= 0 prefill workers and >= 1 decode worker")
        if self.supervise_interval_s < 0:
            raise ValueError("supervise_interval_s must be >= 0")


def default_threads_per_worker(num_workers: int) -> int:
    """Split this machine's cores evenly among the workers (at least one each)."""
    return max(1, (os.cpu_count() or 1) // max(1, num_workers))


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _own_node_host(host: str | None) -> str:
    """Actors on a cluster bind the address of the node they landed on (None); on one
    machine everything binds the loopback address it was given."""
    if host is not None:
        return host
    import ray

    return str(ray.util.get_node_ip_address())


class _RouterActor:
    def __init__(self, config_kwargs: dict[str, Any]):
        from splitserve.router.config import RouterConfig
        from splitserve.router.server import start_router

        config_kwargs = {**config_kwargs, "host": _own_node_host(config_kwargs.get("host"))}
        self.router = start_router(RouterConfig(**config_kwargs))

    def info(self) -> tuple[str, str, str | None]:
        return self.router.address, self.router.cluster_url, self.router.http_address

    def stop(self) -> None:
        self.router.stop(2.0)


def build_worker(role: str, options: Any, flippable: bool = False) -> Any:
    """A PrefillWorker or DecodeWorker (not started), or with `flippable` a FlippableWorker
    playing `role` first (`splitserve prefill|decode --flippable`)."""
    from splitserve.decode_worker.worker import DecodeWorker
    from splitserve.prefill_worker.worker import PrefillWorker

    roles = {"prefill": PrefillWorker, "decode": DecodeWorker}
    if flippable:
        from splitserve.worker.flip import FlippableWorker

        return FlippableWorker(options, roles, role)
    return roles[role](options)


class _WorkerActor:
    def __init__(self, role: str, options: Any, flippable: bool = False):
        options = replace(options, host=_own_node_host(options.host or None))
        self.worker = build_worker(role, options, flippable).start()

    def address(self) -> str:
        return self.worker.address

    def drain(self, wait_timeout_s: float) -> int:
        return self.worker.drain(wait_timeout_s)

    def failed(self) -> bool:
        """Whether the worker's engine failed (it took no more work since)."""
        return bool(self.worker.failed.is_set())

    def stop(self) -> None:
        self.worker.stop(1.0)


@dataclass(frozen=True)
class _WorkerLaunch:
    """What a worker actor of this deployment is started with (at serve() and by
    Deployment.add_worker later)."""

    engine: EngineConfig
    actor_host: str  # "" on a cluster: each actor binds its own node's address
    cluster_url: str
    kv_store: str  # the driver's rendezvous store, host:port
    kv_timeout_s: float
    cluster_token: str
    resources: dict[str, str | None]  # role -> the custom Ray resource that pins it
    env_opts: dict[str, Any]
    flippable: bool
    stream_interval: int = 1

    def start(self, role: str, index: int) -> Any:
        import ray

        from splitserve.worker.runtime import WorkerOptions

        engine = self.engine
        if engine.disk_kv_cache_dir:  # a disk tier of its own (its own LRU and budget)
            engine = replace(engine, disk_kv_cache_dir=os.path.join(
                engine.disk_kv_cache_dir, f"{role}-{index}"))
        options = WorkerOptions(
            engine=engine, worker_id=f"{role}-{index}", host=self.actor_host,
            cluster_url=self.cluster_url, kv_backend="torch_dist", kv_store=self.kv_store,
            kv_timeout_s=self.kv_timeout_s, cluster_token=self.cluster_token,
            stream_interval=self.stream_interval,
        )
        actor_opts: dict[str, Any] = {"num_cpus": 0, **self.env_opts}
        if engine.resolved_device.startswith("cuda"):
            actor_opts["num_gpus"] = 1
        resource = self.resources.get(role)
        if resource:
            actor_opts["resources"] = {resource: 1}
        return ray.remote(**actor_opts)(_WorkerActor).remote(role, options, self.flippable)


@dataclass
class Deployment:
    address: str  # the router's gRPC endpoint
    cluster_url: str
    actors: list[Any]  # the router's, then the workers' (in worker_roles' order)
    kv_store: Any  # the rendezvous TCPStore hosted by this process
    owns_ray: bool
    http_address: str | None = None  # the router's OpenAI-compatible API (host:port)
    worker_roles: list[str] = field(default_factory=list)
    launch: _WorkerLaunch | None = None
    _started: dict[str, int] = field(default_factory=dict)  # role -> workers ever started
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _closed: bool = False  # shutdown() began: an addition still under way is undone
    supervisor: WorkerSupervisor | None = None  # replaces workers that fail or die

    def workers(self) -> list[tuple[Any, str]]:
        """(actor, the role it was launched in) of each worker, now."""
        with self._lock:
            return list(zip(self.actors[1:], self.worker_roles, strict=True))

    def remove_actor(self, actor: Any) -> bool:
        """Forget the worker `actor` (its caller stops it); False if it was not ours (any
        more) or the deployment is shutting down."""
        with self._lock:
            if self._closed:
                return False
            for i, known in enumerate(self.actors[1:]):
                if known is actor:
                    del self.actors[1 + i], self.worker_roles[i]
                    return True
        return False

    def counts(self) -> dict[str, int]:
        """Workers this deployment runs, by the role each was launched in."""
        with self._lock:
            return {role: self.worker_roles.count(role) for role in ("prefill", "decode")}

    def add_worker(self, role: str, timeout_s: float = 600.0) -> str:
        """Start one more worker of `role` (same engine settings and placement rules as the
        first ones) and wait until it serves; its gRPC address. It registers in cluster
        state like any worker, so the router routes to it within its refresh period."""
        import ray

        if role not in ("prefill", "decode"):
            raise ValueError(f"role must be 'prefill' or 'decode', not {role!r}")
        if self.launch is None:
            raise RuntimeError("this deployment was not started by serve(): cannot add workers")
        with self._lock:
            if self._closed:
                raise RuntimeError("the deployment is shutting down")
            index = self._started.get(role, self.worker_roles.count(role))
            self._started[role] = index + 1
        actor = self.launch.start(role, index)
        try:
            address = str(ray.get(actor.address.remote(), timeout=timeout_s))
        except BaseException:
            ray.kill(actor)
            raise
        with self._lock:
            closed = self._closed
            if not closed:
                self.actors.append(actor)
                self.worker_roles.append(role)
        if closed:  # shutdown() did not see it: stop it here
            with contextlib.suppress(Exception):
                ray.get(actor.stop.remote(), timeout=10)
            ray.kill(actor)
            raise RuntimeError("the deployment shut down while a worker was being added")
        return address

    def remove_worker(self, role: str, drain_timeout_s: float = 30.0) -> bool:
        """Drain and stop the most recently started worker launched as `role` (its running
        requests finish first; False when none was). A worker the P:D control switched
        since still counts in the role it was launched in here."""
        import ray

        with self._lock:
            positions = [i for i, r in enumerate(self.worker_roles) if r == role]
            if not positions or self._closed:
                return False
            i = positions[-1]
            actor = self.actors[1 + i]
            del self.actors[1 + i], self.worker_roles[i]
        try:
            ray.get(actor.drain.remote(drain_timeout_s), timeout=drain_timeout_s + 5)
            ray.get(actor.stop.remote(), timeout=10)
        except Exception as exc:  # the worker is leaving either way
            log.warning("removing a %s worker: %s", role, exc)
        ray.kill(actor)
        return True

    def shutdown(self, drain_timeout_s: float = 5.0) -> None:
        import ray

        with self._lock:
            self._closed = True
        if self.supervisor is not None:
            self.supervisor.stop()
        with self._lock:
            router, workers = self.actors[0], self.actors[1:]
        try:
            ray.get([w.drain.remote(drain_timeout_s) for w in workers], timeout=drain_timeout_s + 5)
        except Exception as exc:  # drain is best effort; stopping must go on
            log.warning("drain failed: %s", exc)
        for actor in [router, *workers]:
            try:
                ray.get(actor.stop.remote(), timeout=10)
            except Exception as exc:
                log.warning("stop failed: %s", exc)
            ray.kill(actor)
        if self.owns_ray:
            stop_ray()


_LOCAL_HEAD_ATTEMPTS = 2  # init_ray: starts of a local Ray head whose node timed out


class _RayEnv(NamedTuple):
    """What this process's Ray settings were before init_ray started a local head."""

    variables: dict[str, str]  # the RAY_* environment variables
    cluster_enabled: bool  # ray_constants.ENABLE_RAY_CLUSTER


_ray_env_before_head: _RayEnv | None = None  # set while a local head init_ray started runs


def _ray_variables() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if name.startswith("RAY_")}


def init_ray(ray_address: str | None, num_cpus: int | None = None) -> bool:
    """Join `ray_address`, or start a local head bound to loopback. True if we started it
    (then stop it with stop_ray)."""
    import ray

    global _ray_env_before_head
    if ray.is_initialized():
        return False
    if ray_address:
        ray.init(address=ray_address, log_to_driver=True)
        return False
    # A local head must listen on 127.0.0.1 only. Ray (2.60) binds every interface unless
    # "clusters" are disabled; the flag is read both from the environment (by the processes
    # it starts) and at `import ray` into a constant, so set both. stop_ray puts them back
    # (and the RAY_* variables ray.init sets), so that this process can later start or join
    # a multi-node cluster.
    from ray._private import ray_constants

    _ray_env_before_head = _RayEnv(_ray_variables(), ray_constants.ENABLE_RAY_CLUSTER)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    # Ray's token authentication (every Ray RPC carries a token, kept in ~/.ray/auth_token)
    # is on by default for a new local head since Ray 2.60 (tests/service/test_service_ray
    # checks it); RAY_AUTH_MODE=disabled is the user's explicit choice.
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        log.warning("RAY_AUTH_MODE=disabled: this Ray head accepts unauthenticated callers")
    for attempt in range(1, _LOCAL_HEAD_ATTEMPTS + 1):
        try:
            ray.init(
                num_cpus=num_cpus or os.cpu_count() or 1,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
            return True
        except Exception as exc:
            # Ray gives its raylet 30 s to register with the GCS; on a loaded small host it
            # once never came up at all (no raylet log). A fresh head usually does.
            if "timed out during startup" not in str(exc) or attempt == _LOCAL_HEAD_ATTEMPTS:
                _restore_ray_env()
                raise
            log.warning("the local Ray head did not start (%s); starting it again", exc)
            ray.shutdown()
    raise AssertionError("unreachable")


def stop_ray() -> None:
    """ray.shutdown(); after a local head init_ray started, this process's RAY_* variables
    and Ray's cluster flag as they were before it."""
    import ray

    ray.shutdown()
    _restore_ray_env()


def _restore_ray_env() -> None:
    global _ray_env_before_head
    before, _ray_env_before_head = _ray_env_before_head, None
    if before is None:
        return
    from ray._private import ray_constants

    for name in _ray_variables():
        if name not in before.variables:
            del os.environ[name]
    os.environ.update(before.variables)
    ray_constants.ENABLE_RAY_CLUSTER = before.cluster_enabled


def serve(options: ServeOptions) -> Deployment:
    import ray

    from splitserve.kvtransfer.torch_dist import create_rendezvous_store

    owns_ray = init_ray(options.ray_address)
    local = options.ray_address is None
    # The driver hosts the KV rendezvous store; actors bind their own node's address.
    driver_host = "127.0.0.1" if local else ray.util.get_node_ip_address()
    actor_host = "127.0.0.1" if local else None
    kv_port = _free_port(driver_host)
    kv_store = create_rendezvous_store(driver_host, kv_port)
    # Every deployment has a cluster token: the given one, SPLITSERVE_CLUSTER_TOKEN, or a new
    # random one that only this driver and its actors know.
    token = envs.cluster_token(options.router_options.get("cluster_token")) or \
        secrets.token_urlsafe(32)
    router_cfg = {"model": options.engine.model, "host": actor_host, "port": options.port,
                  "http_port": options.http_port,
                  "block_size": options.engine.block_size, "cluster_url": options.redis_url,
                  **options.router_options, "cluster_token": token}
    # Actors on other nodes do not inherit this process's environment: hand them the TLS
    # folder (which must exist at the same path on every node, e.g. a mounted secret).
    tls_dir = envs.tls_dir()
    env_opts: dict[str, Any] = (
        {"runtime_env": {"env_vars": {"SPLITSERVE_TLS_DIR": tls_dir}}} if tls_dir else {})
    router = ray.remote(num_cpus=0, **env_opts)(_RouterActor).remote(router_cfg)
    address, cluster_url, http_address = ray.get(
        router.info.remote(), timeout=120)  # type: ignore[attr-defined]  # an actor method
    num_workers = options.prefill_workers + options.decode_workers
    engine = options.engine
    if engine.num_threads is None and options.ray_address is None:
        engine = replace(engine, num_threads=default_threads_per_worker(num_workers))
    launch = _WorkerLaunch(
        engine=engine, actor_host=actor_host or "", cluster_url=cluster_url,
        kv_store=f"{driver_host}:{kv_port}", kv_timeout_s=options.kv_timeout_s,
        cluster_token=token,
        resources={"prefill": options.prefill_resource, "decode": options.decode_resource},
        env_opts=env_opts, flippable=options.flippable, stream_interval=options.stream_interval)
    roles = ["prefill"] * options.prefill_workers + ["decode"] * options.decode_workers
    actors: list[Any] = [router]
    for role in ("prefill", "decode"):
        actors += [launch.start(role, index) for index in range(roles.count(role))]
    ray.get([a.address.remote() for a in actors[1:]], timeout=600)
    # Workers added later (the autoscaler, the supervisor) take the next index of their
    # role: never the id of a live one (a replacement for decode-0 must not be decode-1).
    deployment = Deployment(address, cluster_url, actors, kv_store, owns_ray, http_address,
                            worker_roles=roles, launch=launch,
                            _started={role: roles.count(role) for role in ("prefill", "decode")})
    if options.supervise_interval_s:
        deployment.supervisor = WorkerSupervisor(deployment,
                                                 options.supervise_interval_s).start()
    return deployment
