"""What every request of one router shares: model, cluster state, workers, policy."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from splitserve.router.cluster_io import AsyncStore
from splitserve.router.config import RouterConfig
from splitserve.router.model import ServedModel
from splitserve.router.output_channel import OutputChannels
from splitserve.router.policy import PrefillPolicy, RoutingRules, make_prefill_policy
from splitserve.router.workers import WorkerDirectory


@dataclass
class RouterState:
    config: RouterConfig
    model: ServedModel
    store: AsyncStore
    directory: WorkerDirectory
    policy: PrefillPolicy
    rules: RoutingRules
    # Decode workers' output channels (router.output_channel); none opened when disabled.
    output_channels: OutputChannels = field(
        default_factory=lambda: OutputChannels(None, enabled=False))
    # Cleanup tasks that must finish even when their request's task is cancelled.
    background: set[asyncio.Task[Any]] = field(default_factory=set)

    @classmethod
    def build(cls, config: RouterConfig, model: ServedModel, store: AsyncStore) -> RouterState:
        channels = OutputChannels(config.resolved_cluster_token, config.output_channels)
        directory = WorkerDirectory(
            store, model.model_id, config.block_size, config.worker_refresh_s,
            config.resolved_cluster_token, stale_s=config.cluster_stale_s,
            # A decode worker's output channel opens as soon as the router finds it.
            on_decode_worker=lambda info: channels.learn(info.address, info.output_endpoint))
        rules = RoutingRules(
            block_size=config.block_size,
            local_prefill_threshold=config.local_prefill_threshold,
            local_prefix_fraction=config.local_prefix_fraction,
        )
        return cls(config, model, store, directory, make_prefill_policy(config.prefill_policy),
                   rules, channels)

    @property
    def max_admit_attempts(self) -> int:
        return self.config.max_admit_attempts

    @property
    def prefill_timeout_ms(self) -> int:
        return self.config.prefill_timeout_ms

    @property
    def prefill_timeout_s(self) -> float | None:
        """The router's deadline on a Prefill call (None: only the request's)."""
        ms = self.config.prefill_timeout_ms
        return ms / 1000.0 if ms else None

    async def shielded(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` to completion even if the caller is cancelled meanwhile."""
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        await asyncio.shield(task)

    async def wait_background(self, timeout_s: float) -> None:
        if self.background:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*self.background, return_exceptions=True),
                                       timeout_s)
