"""An in-process deployment for service tests: the real router and workers, real gRPC on
127.0.0.1, real KV transfer over gloo (torch_dist) between the workers' threads."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from splitserve.decode_worker.worker import DecodeWorker
from splitserve.engine.config import EngineConfig
from splitserve.kvtransfer.torch_dist import create_rendezvous_store
from splitserve.prefill_worker.worker import PrefillWorker
from splitserve.router.config import RouterConfig
from splitserve.router.server import RunningRouter, start_router
from splitserve.worker.runtime import WorkerOptions


@dataclass
class Deployment:
    router: RunningRouter
    prefill: list[PrefillWorker]
    decode: list[DecodeWorker]
    kv_store: Any
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return self.router.address

    def free_blocks(self, workers: list[PrefillWorker | DecodeWorker] | None = None
                    ) -> dict[str, tuple[int, int]]:
        """worker id -> (free blocks, total blocks) of `workers` (default: all), read on each
        engine's own thread."""
        out = {}
        for w in [*self.prefill, *self.decode] if workers is None else workers:
            out[w.worker_id] = w.loop.call(
                lambda e: (e.block_manager.num_free_blocks, e.block_manager.num_blocks)
            )
        return out

    def wait_all_blocks_free(self, timeout_s: float = 10.0,
                             workers: list[PrefillWorker | DecodeWorker] | None = None
                             ) -> dict[str, tuple[int, int]]:
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.free_blocks(workers)
            if all(free == total for free, total in state.values()):
                return state
            if time.monotonic() > deadline:
                return state
            time.sleep(0.05)

    def stop(self) -> None:
        for w in [*self.prefill, *self.decode]:
            w.stop(0.5)
        self.router.stop(1.0)


def start_deployment(
    model: str,
    num_prefill: int = 1,
    num_decode: int = 1,
    *,
    engine: dict[str, Any] | None = None,
    router: dict[str, Any] | None = None,
    kv_timeout_s: float = 10.0,
    cluster_token: str | None = None,
    engine_overrides: dict[str, dict[str, Any]] | None = None,  # worker id -> engine fields
    worker_options: dict[str, Any] | None = None,  # more WorkerOptions fields, every worker
    heartbeat_ttl_s: float = 2.0,
) -> Deployment:
    engine_cfg = EngineConfig(model=model, **(engine or {}))
    router_kwargs = {"model": model, "block_size": engine_cfg.block_size,
                     "cluster_token": cluster_token, **(router or {})}
    running = start_router(RouterConfig(**router_kwargs))
    store = create_rendezvous_store("127.0.0.1", 0)
    kv_store = f"127.0.0.1:{store.port}"

    def options(role: str, index: int) -> WorkerOptions:
        worker_id = f"{role}-{index}"
        override = (engine_overrides or {}).get(worker_id, {})
        return WorkerOptions(engine=dataclasses.replace(engine_cfg, **override),
                             worker_id=worker_id,
                             cluster_url=running.cluster_url, kv_store=kv_store,
                             kv_timeout_s=kv_timeout_s, heartbeat_ttl_s=heartbeat_ttl_s,
                             cluster_token=cluster_token, **(worker_options or {}))

    prefill = [PrefillWorker(options("prefill", i)).start() for i in range(num_prefill)]
    decode = [DecodeWorker(options("decode", i)).start() for i in range(num_decode)]
    deployment = Deployment(running, prefill, decode, store)
    wait_for_workers(running, num_prefill + num_decode)
    return deployment


def wait_for_workers(router: RunningRouter, count: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(router.store.live_workers()) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(router.store.live_workers())} of {count} workers live")
        time.sleep(0.05)
