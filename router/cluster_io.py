"""The router's asyncio face of the ClusterStore, and its request-ledger writer.

Store methods block (Redis, gRPC); they run on a worker thread unless the store lives in
this process's memory, where a call takes microseconds. Ledger writes are bookkeeping for
recovery: a failed write is logged, never fatal to the request.

The prefix index is looked up for every request: where the store keeps a mirror of it in
this process (Redis: cluster.prefix_mirror), lookups read the mirror, which
`sync_prefixes` (called with every read of the live workers) brings up to date.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from collections.abc import Set as AbstractSet
from typing import Any, TypeVar

from splitserve.cluster import InMemoryClusterStore
from splitserve.cluster.store import (
    ClusterStore,
    LiveWorker,
    PrefixOverlap,
    RequestLedgerEntry,
    RequestPhase,
)
from splitserve.router.policy import RoutingRules, weighted_overlap

log = logging.getLogger(__name__)

T = TypeVar("T")
_HINT_WAIT_S = 0.5  # longest a request waits for the prefix index (a hint) to answer


class AsyncStore:
    """Awaitable wrappers over the ClusterStore methods the router uses."""

    def __init__(self, store: ClusterStore) -> None:
        self.store = store
        self._inline = isinstance(store, InMemoryClusterStore)
        self._prefixes = store.prefix_mirror()
        self._mirror_error = False

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._inline:
            return fn(*args)
        return await asyncio.to_thread(fn, *args)

    async def add_service(self, deltas: dict[str, float]) -> dict[str, float]:
        return await self._call(self.store.add_service, deltas)

    async def live_workers(self) -> list[LiveWorker]:
        return await self._call(self.store.live_workers)

    async def prefix_overlap(self, block_hashes: list[int]) -> dict[str, int]:
        """Cached leading blocks per worker; none known while the store is unreachable
        (routing then ignores caches rather than failing the request)."""
        if not block_hashes:
            return {}
        try:
            return await asyncio.wait_for(self._call(self.store.prefix_overlap, block_hashes),
                                          _HINT_WAIT_S)
        except Exception:  # noqa: BLE001 - a routing hint never fails a request
            log.warning("prefix index read failed; routing without it", exc_info=True)
            return {}

    async def sync_prefixes(self) -> None:
        """Bring the store's prefix mirror (if it has one) up to date; on failure it keeps
        what it had (a routing hint: logged once per outage, never raised)."""
        if self._prefixes is None:
            return
        try:
            await asyncio.to_thread(self._prefixes.sync)
        except Exception:  # noqa: BLE001 - a routing hint never fails a request
            if not self._mirror_error:
                log.warning("prefix log read failed; routing on the last copy", exc_info=True)
            self._mirror_error = True
            return
        self._mirror_error = False

    async def prefix_overlap_tiers(self, block_hashes: list[int],
                                   among: AbstractSet[str] | None = None
                                   ) -> dict[str, PrefixOverlap]:
        """Each worker's (in `among`, if given) run of the prompt through its device, host
        and disk tiers; none known while the store is unreachable (as prefix_overlap). From
        the mirror where there is one (dropped workers left out; ones expired since may
        remain)."""
        if not block_hashes:
            return {}
        if self._prefixes is not None:
            return self._prefixes.overlap_tiers(block_hashes, among)
        try:
            if self._inline:  # microseconds, and no task per request
                return self.store.prefix_overlap_tiers(block_hashes, among)
            return await asyncio.wait_for(
                self._call(self.store.prefix_overlap_tiers, block_hashes, among), _HINT_WAIT_S)
        except Exception:  # noqa: BLE001 - a routing hint never fails a request
            log.warning("prefix index read failed; routing without it", exc_info=True)
            return {}

    async def weighted_prefix_overlap(self, block_hashes: list[int],
                                      among: AbstractSet[str] | None, rules: RoutingRules
                                      ) -> Mapping[str, float]:
        """weighted_overlap(await self.prefix_overlap_tiers(block_hashes, among), rules), in
        no particular order: what a routing decision weighs. Read in one pass where the
        prefix index is in this process (the in-memory store, a Redis store's mirror)."""
        if not block_hashes:
            return {}
        weights = (rules.host_block_weight, rules.disk_block_weight)
        try:
            if self._prefixes is not None:
                return self._prefixes.weighted_runs(block_hashes, among, *weights)
            if isinstance(self.store, InMemoryClusterStore):
                return self.store.weighted_prefix_overlap(block_hashes, among, *weights)
        except Exception:  # noqa: BLE001 - a routing hint never fails a request
            log.warning("prefix index read failed; routing without it", exc_info=True)
            return {}
        return weighted_overlap(await self.prefix_overlap_tiers(block_hashes, among), rules)

    async def ledger_put(self, entry: RequestLedgerEntry) -> None:
        try:
            await self._call(self.store.ledger_put, entry)
        except Exception:  # noqa: BLE001 - the ledger never fails a request
            log.warning("ledger write for %s failed", entry.request_id, exc_info=True)

    async def ledger_delete(self, request_id: str) -> None:
        try:
            await self._call(self.store.ledger_delete, request_id)
        except Exception:  # noqa: BLE001 - the ledger never fails a request
            log.warning("ledger delete for %s failed", request_id, exc_info=True)


_PROGRESS_EVERY_S = 1.0


class RequestLedger:
    """One request's ledger entry, rewritten at each phase change (and about every second
    while tokens flow) and deleted at the end.

    Phases: QUEUED (admitted by the router) -> ADMITTED (D reserved blocks) ->
    PREFILLING (P computes, remote prefill only) -> DECODING (D generates) -> deleted.
    Writes run in the background, in order, off the request's critical path; `delete`
    waits for them.
    """

    def __init__(self, store: AsyncStore, request_id: str, num_prompt_tokens: int) -> None:
        self._store = store
        self._entry = RequestLedgerEntry(
            request_id=request_id,
            phase=RequestPhase.QUEUED,
            num_prompt_tokens=num_prompt_tokens,
        )
        self._written = False
        self._last_write: asyncio.Task[None] | None = None

    @property
    def phase(self) -> RequestPhase:
        return self._entry.phase

    def update(self, phase: RequestPhase, **fields: Any) -> None:
        """Move to `phase`, replacing the named RequestLedgerEntry fields."""
        self._entry = dataclasses.replace(
            self._entry, **fields, phase=phase, updated_at=time.time()
        )
        self._written = True
        self._chain(self._store.ledger_put(self._entry))

    def progress(self, phase: RequestPhase, num_generated_tokens: int) -> None:
        """Tokens relayed so far: written on a phase change, else at most every
        _PROGRESS_EVERY_S (the router's own state has every token; the ledger is for
        operators and for finding what a lost worker held)."""
        now = time.time()
        if phase is self._entry.phase and now - self._entry.updated_at < _PROGRESS_EVERY_S:
            return
        self.update(phase, num_generated_tokens=num_generated_tokens)

    async def delete(self) -> None:
        """Delete the entry (if one was written) once earlier writes are done."""
        if self._written:
            self._written = False
            self._chain(self._store.ledger_delete(self._entry.request_id))
        if self._last_write is not None:
            await self._last_write

    def _chain(self, write: Coroutine[Any, Any, None]) -> None:
        previous = self._last_write

        async def after_previous() -> None:
            if previous is not None:
                await previous
            await write

        self._last_write = asyncio.get_running_loop().create_task(after_previous())
