"""The router's usable workers, indexed for routing decisions (router.workers keeps it current).

A `RoleIndex` holds, for one role (decode or prefill), each usable worker's current
`WorkerView` (its last load report plus the work this router sent it since) and the
orders the policies read, as sorted lists of keys (router.policy's keys, each ending in the
worker_id). A view changes only when a store read brings a new load report or
registration, or when this router assigns or releases work on the worker, so a change
re-sorts one worker (two bisections and a list insert per order, O(log n) comparisons),
and a decision reads the first few entries of an order instead of building and sorting
every worker's view:

    decode ranking         rank_decode: the first k fitting workers in load order (or, when
                           few fit, the fitting prefix of the room order, sorted)
    least_loaded           the first candidate in prefill load order
    kv_aware               the workers caching part of the prompt, plus the first other
                           candidate in load order
    round_robin            the i-th candidate in worker_id order
    latency                a numpy table of the prefill workers' loads and step times,
                           one row per worker in worker_id order (router.latency)

Workers left out of a decision (ejected, lost by the request: by address; the decode worker
itself among prefill candidates: by id) are skipped while reading an order, never removed.
A `ClusterSnapshot` reads the index live: what a request ranks is the state at the moment it
ranks, with the assignments of requests routed since its snapshot() included.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from splitserve.cluster.store import LiveWorker, WorkerInfo, WorkerLoadReport, WorkerRole
from splitserve.common.cluster_types import WorkerIdUnion
from splitserve.router.policy import (
    WorkerView,
    decode_load_key,
    decode_room_key,
    prefill_load_key,
)

KeyFn = Callable[[WorkerView], tuple[Any, ...]]  # a sort key ending in the worker_id
RowFn = Callable[[WorkerView], tuple[float, ...]]

_SORT_FEW = 8  # rank_decode sorts the fitting workers when fewer than 1/_SORT_FEW fit


@dataclass(eq=False)
class Assignment:
    """Work this router sent to a worker that its load report may not show yet."""

    worker_id: str
    running: int = 0  # requests (decode side)
    blocks: int = 0  # KV blocks the request will hold
    queued_tokens: int = 0  # prompt tokens to prefill (prefill side)
    started_at: float = field(default_factory=time.time)  # wall clock, like load reports


def build_view(info: WorkerInfo, load: WorkerLoadReport | None,
               pending: list[Assignment]) -> WorkerView:
    """The worker as last reported, plus the work sent to it since."""
    return view_with(info, load, PendingWork(load, pending))


class PendingWork:
    """The work of a worker's pending assignments that its load report `load` does not show
    yet (those started at or after the report's time), summed; kept up to date with
    add() as assignments come, go or change their start, so that a view costs O(1) however
    many requests the router has sent the worker since its report."""

    __slots__ = ("load", "_since", "running", "blocks", "queued_tokens")

    def __init__(self, load: WorkerLoadReport | None, pending: list[Assignment]) -> None:
        self.load = load
        self._since = float("-inf") if load is None else load.updated_at
        self.running = self.blocks = self.queued_tokens = 0
        for a in pending:
            self.add(a, 1)

    def add(self, assignment: Assignment, sign: int) -> None:
        """Count (sign 1) or stop counting (-1) `assignment`, if the report does not show it."""
        if assignment.started_at >= self._since:  # not in the report yet
            self.running += sign * assignment.running
            self.blocks += sign * assignment.blocks
            self.queued_tokens += sign * assignment.queued_tokens


def view_with(info: WorkerInfo, load: WorkerLoadReport | None, work: PendingWork) -> WorkerView:
    """The worker's view: its report `load` plus `work` (made for that report)."""
    if load is None:  # never reported: an idle worker with an empty cache
        load = WorkerLoadReport(num_free_blocks=info.num_total_blocks, updated_at=float("-inf"))
    return WorkerView(info.worker_id, info.address, info.kv_endpoint, load.num_waiting,
                      load.num_running + work.running,
                      max(0, load.num_free_blocks - work.blocks), info.num_total_blocks,
                      load.num_queued_tokens + work.queued_tokens, load.step_model)


def reference_views(live: list[LiveWorker], pending: Mapping[str, list[Assignment]],
                    usable: Callable[[WorkerInfo], bool]
                    ) -> tuple[list[WorkerView], list[WorkerView]]:
    """(decode, prefill) views of the `usable` workers of a store read, in its order: every
    view built afresh (O(workers)), the reference the index must equal."""
    decode, prefill = [], []
    for info, load in live:
        if usable(info):
            view = build_view(info, load, pending.get(info.worker_id, []))
            if info.role.can_serve(WorkerRole.DECODE):
                decode.append(view)
            if info.role.can_serve(WorkerRole.PREFILL):
                prefill.append(view)
    return decode, prefill


class RoleIndex:
    """The usable workers of one role: views by id, sorted orders, an optional table."""

    def __init__(self, *orders: KeyFn) -> None:
        self.views: dict[str, WorkerView] = {}
        self._key_fns = orders
        self._orders: list[list[tuple[Any, ...]]] = [[] for _ in orders]
        self._keys: dict[str, list[tuple[Any, ...]]] = {}  # worker_id -> its key in each order
        self._ids: list[str] = []  # sorted
        self._id_set: frozenset[str] | None = None  # the same ids (built on first use)
        self._by_address: dict[str, set[str]] = {}
        self.unknown_step_times: set[str] = set()  # ids whose view has no step_model
        self._row_fn: RowFn | None = None
        self._table: np.ndarray | None = None  # [num workers, row width], rows in _ids order
        self._row_of: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.views)

    def put(self, view: WorkerView) -> None:
        """Add `view`, or replace the view of the same worker."""
        wid = view.worker_id
        old = self.views.get(wid)
        if old is not None:
            self._unsort(wid, old, view.address)
        else:
            bisect.insort(self._ids, wid)
            self._table = None  # rows moved
            self._id_set = None
        self.views[wid] = view
        if old is None or old.address != view.address:
            self._by_address.setdefault(view.address, set()).add(wid)
        keys = self._keys[wid] = [key_fn(view) for key_fn in self._key_fns]
        for key, order in zip(keys, self._orders, strict=True):
            bisect.insort(order, key)
        if view.step_model is None:
            self.unknown_step_times.add(wid)
        elif self.unknown_step_times:
            self.unknown_step_times.discard(wid)
        if self._table is not None and self._row_fn is not None:
            self._table[self._row_of[wid]] = self._row_fn(view)

    def remove(self, worker_id: str) -> None:
        old = self.views.pop(worker_id, None)
        if old is None:
            return
        self._unsort(worker_id, old, None)
        del self._keys[worker_id]
        del self._ids[bisect.bisect_left(self._ids, worker_id)]
        self._id_set = None
        self.unknown_step_times.discard(worker_id)
        self._table = None

    def _unsort(self, worker_id: str, view: WorkerView, new_address: str | None) -> None:
        """Take `view` out of the orders (and of its address unless it stays there)."""
        for key, order in zip(self._keys[worker_id], self._orders, strict=True):
            del order[bisect.bisect_left(order, key)]
        if view.address == new_address:
            return
        at = self._by_address[view.address]
        at.discard(worker_id)
        if not at:
            del self._by_address[view.address]

    def ordered(self, i: int) -> Iterator[WorkerView]:
        """Every worker in order `i` (the i-th KeyFn given at construction)."""
        views = self.views
        return (views[key[-1]] for key in self._orders[i])

    def ids(self) -> list[str]:
        """Worker ids, sorted (the index's own list: do not change it)."""
        return self._ids

    def id_set(self) -> frozenset[str]:
        """Worker ids as a frozenset (kept until a worker comes or goes)."""
        if self._id_set is None:
            self._id_set = frozenset(self._ids)
        return self._id_set

    def ids_at(self, addresses: Collection[str]) -> set[str]:
        """Ids of the workers at any of `addresses`."""
        return set().union(*(self._by_address.get(a, ()) for a in addresses))

    def count_before(self, i: int, bound: tuple[Any, ...]) -> int:
        """Keys of order `i` that sort before `bound`."""
        return bisect.bisect_left(self._orders[i], bound)

    def table(self, row_fn: RowFn) -> tuple[np.ndarray, dict[str, int]]:
        """Rows of `row_fn(view)`, one per worker in worker_id order, and each worker's row.
        Built on first use (and after workers come or go), then kept current by put()."""
        if self._table is None or self._row_fn is not row_fn:
            self._row_fn = row_fn
            self._row_of = {wid: i for i, wid in enumerate(self._ids)}
            rows = [row_fn(self.views[wid]) for wid in self._ids]
            self._table = (np.array(rows, dtype=np.float64) if rows
                           else np.zeros((0, 0), dtype=np.float64))  # (no worker: no row)
        return self._table, self._row_of


def decode_index() -> RoleIndex:
    return RoleIndex(decode_load_key, decode_room_key)


def prefill_index() -> RoleIndex:
    return RoleIndex(prefill_load_key)


class Candidates:
    """The prefill workers in `index` less those at an `out` address and `skip_id`
    (router.policy.PrefillCandidates). Read it at once: it does not follow workers that
    come or go in the index after it was made."""

    __slots__ = ("index", "out", "skip_id", "_skipped")

    def __init__(self, index: RoleIndex, out: frozenset[str] = frozenset(),
                 skip_id: str = "") -> None:
        self.index, self.out, self.skip_id = index, out, skip_id
        skipped = index.ids_at(out) if out else set()
        if skip_id in index.views:
            skipped.add(skip_id)
        ids = index.ids()
        self._skipped = sorted(bisect.bisect_left(ids, wid) for wid in skipped)

    def __len__(self) -> int:
        return len(self.index) - len(self._skipped)

    def _takes(self, view: WorkerView) -> bool:
        return view.worker_id != self.skip_id and view.address not in self.out

    def get(self, worker_id: str) -> WorkerView | None:
        view = self.index.views.get(worker_id)
        return view if view is not None and self._takes(view) else None

    def among(self, worker_ids: Iterable[str]) -> list[WorkerView]:
        """The candidates among `worker_ids`, in their order."""
        views, out, skip_id = self.index.views, self.out, self.skip_id
        return [v for v in map(views.get, worker_ids)
                if v is not None and v.worker_id != skip_id and v.address not in out]

    def by_load(self) -> Iterator[WorkerView]:
        return (v for v in self.index.ordered(0) if self._takes(v))

    def by_id(self, i: int) -> WorkerView:
        for position in self._skipped:  # sorted: each one at or before i shifts it on
            if position > i:
                break
            i += 1
        return self.index.views[self.index.ids()[i]]

    def all(self) -> list[WorkerView]:
        return [v for v in (self.index.views[wid] for wid in self.index.ids()) if self._takes(v)]


def rank_decode(index: RoleIndex, out: Collection[str], num_blocks: int,
                limit: int) -> list[WorkerView]:
    """rank_decode_workers(workers not at an `out` address, num_blocks)[:limit]."""
    top: list[WorkerView] = []
    if limit <= 0:
        return top
    num_fit = index.count_before(1, (-num_blocks + 1,))  # room order: free >= num_blocks
    if num_fit * _SORT_FEW < len(index):  # few fit: sort them rather than scan for them
        fits = sorted((v for v in itertools.islice(index.ordered(1), num_fit)
                       if v.address not in out), key=decode_load_key)
        top += fits[:limit]
    else:
        for view in index.ordered(0):
            if view.num_free_blocks >= num_blocks and view.address not in out:
                top.append(view)
                if len(top) == limit:
                    return top
    if len(top) < limit:
        for view in index.ordered(1):
            if view.num_free_blocks < num_blocks and view.address not in out:
                top.append(view)
                if len(top) == limit:
                    break
    return top


@dataclass(frozen=True)
class ClusterSnapshot:
    """Usable live workers (serving our model with our block size), read live from the
    directory's index, less the workers at `decode_out` / `prefill_out` addresses."""

    decode_index: RoleIndex  # DECODE and BOTH workers
    prefill_index: RoleIndex  # PREFILL and BOTH workers
    decode_out: frozenset[str] = frozenset()
    prefill_out: frozenset[str] = frozenset()
    num_ignored: int = 0  # live workers skipped for another model or block size

    @property
    def decode(self) -> list[WorkerView]:
        """Every decode worker, by worker_id (O(workers): for counts and tests)."""
        return Candidates(self.decode_index, self.decode_out).all()

    @property
    def prefill(self) -> list[WorkerView]:
        return Candidates(self.prefill_index, self.prefill_out).all()

    def has_decode(self) -> bool:
        out = self.decode_out
        return any(v.address not in out for v in self.decode_index.ordered(0))

    def without(self, addresses: Collection[str]) -> ClusterSnapshot:
        """This snapshot less the workers at `addresses` too."""
        if not addresses:
            return self
        return ClusterSnapshot(self.decode_index, self.prefill_index,
                               self.decode_out | frozenset(addresses),
                               self.prefill_out | frozenset(addresses), self.num_ignored)

    def rank_decode(self, num_blocks: int, limit: int) -> list[WorkerView]:
        return rank_decode(self.decode_index, self.decode_out, num_blocks, limit)

    def overlap_scope(self, ranked: list[WorkerView], prefill: bool) -> AbstractSet[str]:
        """The workers whose prompt overlap a decision reads: the `ranked` decode workers
        (whether to prefill locally), and the prefill workers when the policy weighs their
        caches (kv_aware, latency)."""
        ids = {w.worker_id for w in ranked}
        return WorkerIdUnion(self.prefill_index.id_set(), ids) if prefill else ids

    def prefill_candidates(self, decode_id: str = "") -> Candidates:
        """The prefill workers a request decoded on `decode_id` may use."""
        return Candidates(self.prefill_index, self.prefill_out, decode_id)
