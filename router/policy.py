"""Routing policies: which decode worker, which prefill worker, and whether to disaggregate.

Pure functions over `WorkerView`s (a worker's registration plus its latest load, as the
router sees it), unit-tested with exact picks. Ties always end on worker_id so a pick is
deterministic for a given input.

Each decision has two forms: the plain one over a list of views (`rank_decode_workers`,
`PrefillPolicy.pick`, `plan_route`), the reference; and the one the router runs, over
the workers kept sorted by these keys (`PrefillCandidates`, router.worker_index), which
reads the first few workers of an order instead of every worker. Both pick the same
worker for the same state (tests/router/test_indexed_routing.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from splitserve.common.cluster_types import PrefixOverlap
from splitserve.common.step_time import StepTimeModel


class WorkerView(NamedTuple):
    """One live worker as a policy sees it. (A named tuple, not a frozen dataclass: the
    router builds one on every assign and release, ~0.6 us against the dataclass's ~1.5
    on the development VM.)"""

    worker_id: str
    address: str = ""  # host:port of its gRPC server
    kv_endpoint: str = ""  # opaque KV transfer endpoint (kvtransfer's format)
    num_waiting: int = 0  # requests waiting to be scheduled
    num_running: int = 0  # requests in the running batch
    num_free_blocks: int = 0  # KV blocks free for new requests
    num_total_blocks: int = 0
    num_queued_tokens: int = 0  # prompt tokens waiting to be prefilled
    step_model: StepTimeModel | None = None  # its engine's step times (router.latency)


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """KV blocks that hold `num_tokens` token slots."""
    return -(-num_tokens // block_size)


def cached_tokens(num_cached_blocks: float, block_size: int, prompt_len: int) -> float:
    """Prompt tokens covered by a leading run of cached full blocks (weighted blocks give
    weighted tokens, see weighted_overlap)."""
    return min(num_cached_blocks * block_size, prompt_len)


def weighted_overlap(overlap: Mapping[str, PrefixOverlap],
                     rules: RoutingRules) -> dict[str, float]:
    """worker_id -> its prompt run in device-block equivalents: a block in the host (disk)
    tier is loaded, not computed, but costs a copy (a read) the device does not, so it
    weighs rules.host_block_weight (disk_block_weight) of a device hit; a miss weighs 0."""
    host, disk = rules.host_block_weight, rules.disk_block_weight
    return {wid: run.weighted(host, disk) for wid, run in overlap.items()}


# ---- decode worker -----------------------------------------------------------------------


# Prompt tokens queued on a decode worker (its local prefills not yet computed) rank it
# one step down per this many: a request sent there waits for them before its own prefill
# (or, prefilled elsewhere, decodes beside their chunks), while one more sequence in its
# decode batch costs it little. Below one step, running sequences decide.
QUEUED_TOKENS_PER_RANK = 256


def decode_load_key(w: WorkerView) -> tuple[int, int, int, int, str]:
    return (w.num_queued_tokens // QUEUED_TOKENS_PER_RANK, w.num_running, w.num_waiting,
            w.num_queued_tokens, w.worker_id)


def decode_room_key(w: WorkerView) -> tuple[int, int, int, int, int, str]:
    """Most free blocks first, then decode_load_key."""
    return (-w.num_free_blocks, *decode_load_key(w))


def rank_decode_workers(workers: Sequence[WorkerView], num_blocks: int) -> list[WorkerView]:
    """Decode workers in the order to try them for a request needing `num_blocks` blocks.

    Workers with at least `num_blocks` free blocks come first, least loaded first
    (fewest steps of queued prompt tokens, see QUEUED_TOKENS_PER_RANK; then num_running,
    num_waiting, num_queued_tokens); then the others, most free blocks first (their free
    count may be stale, or preemption may make room).
    """
    fits = [w for w in workers if w.num_free_blocks >= num_blocks]
    short = [w for w in workers if w.num_free_blocks < num_blocks]
    fits.sort(key=decode_load_key)
    short.sort(key=decode_room_key)
    return fits + short


# ---- conditional disaggregation ------------------------------------------------------------


def should_prefill_locally(
    prompt_len: int,
    decode_cached_tokens: float,
    has_prefill_worker: bool,
    threshold: int,
    prefix_fraction: float,
) -> bool:
    """True when the decode worker should prefill the prompt itself.

    That is when the prompt is short (<= threshold tokens: a KV transfer would cost more
    than it saves), when no prefill worker is live, or when the decode worker's prefix
    cache already holds at least `prefix_fraction` of the prompt.
    """
    if prompt_len <= threshold or not has_prefill_worker:
        return True
    return decode_cached_tokens >= prefix_fraction * prompt_len


# ---- prefill worker ------------------------------------------------------------------------


class PrefillCandidates(Protocol):
    """The prefill workers a policy may pick from, indexed (router.worker_index): a
    worker's view by id, and the workers in two orders."""

    def __len__(self) -> int: ...

    def get(self, worker_id: str) -> WorkerView | None:
        """The candidate `worker_id`, None if it is not one."""
        ...

    def by_load(self) -> Iterator[WorkerView]:
        """The candidates in prefill_load_key order."""
        ...

    def by_id(self, i: int) -> WorkerView:
        """The i-th candidate in worker_id order (0 <= i < len)."""
        ...

    def among(self, worker_ids: Iterable[str]) -> list[WorkerView]:
        """The candidates among `worker_ids`, in their order."""
        ...


class PrefillPolicy(Protocol):
    name: str
    reads_prefill_overlap: bool  # whether a pick reads the prefill workers' overlap_blocks

    def pick(
        self,
        workers: Sequence[WorkerView],
        prompt_len: int,
        overlap_blocks: Mapping[str, float],
        block_size: int,
    ) -> WorkerView | None:
        """The prefill worker for a prompt of `prompt_len` tokens, or None if `workers` is empty.

        `overlap_blocks`: worker_id -> leading full blocks of the prompt in its prefix cache
        (tier hits weighted, see weighted_overlap).
        """
        ...

    def pick_from(
        self,
        candidates: PrefillCandidates,
        prompt_len: int,
        overlap_blocks: Mapping[str, float],
        block_size: int,
    ) -> WorkerView | None:
        """What `pick` picks among the same workers, read from the index."""
        ...


def prefill_load_key(w: WorkerView) -> tuple[int, int, str]:
    return (w.num_queued_tokens, w.num_waiting, w.worker_id)


class RoundRobinPolicy:
    """Cycles through the workers in worker_id order, ignoring load and caches."""

    name = "round_robin"
    reads_prefill_overlap = False

    def __init__(self) -> None:
        self._turn = 0

    def pick(
        self,
        workers: Sequence[WorkerView],
        prompt_len: int,
        overlap_blocks: Mapping[str, float],
        block_size: int,
    ) -> WorkerView | None:
        if not workers:
            return None
        ordered = sorted(workers, key=lambda w: w.worker_id)
        choice = ordered[self._turn % len(ordered)]
        self._turn += 1
        return choice

    def pick_from(
        self,
        candidates: PrefillCandidates,
        prompt_len: int,
        overlap_blocks: Mapping[str, float],
        block_size: int,
    ) -> WorkerView | None:
        if not len(candidates):
            return None
        choice = candidates.by_id(self._turn % len(candidates))
        self._turn += 1
        return choice


class LeastLoadedPolicy:
    """Fewest queued prompt tokens, then fewest waiting requests, then worker_id."""

    name = "least_loaded"
    reads_prefill_overlap = False

    def pick(
        self,
        workers: Sequence[WorkerView],
        prompt_len: int,
        overlap_blocks: Mapping[str, float],
        block_size: int,
    ) -> WorkerView | None:
        return min(workers, key=prefill_load_key, default=None)

    def pick_from(
        self,
        candidates: PrefillCandidates,
        prompt_len: int,
        overlap_blocks: Mapping[str, float],
        block_size: int,
    ) -> WorkerView | None:
        return next(candidates.by_load(), None)


class KvAwarePolicy:
    """Least estimated work: prompt tokens the worker must compute (not in its prefix
    cache) plus the prompt tokens already queued on it. Ties: least loaded, then worker_id.
    """

    name = "kv_aware"
    reads_prefill_overlap = True

    def pick(
        self,
        workers: Sequence[WorkerView],
        prompt_len: int,
        overlap_blocks: Mapping[str, float],
        block_size: int,
    ) -> WorkerView | None:
        def cost(w: WorkerView) -> tuple[float, int, int, str]:
            cached = cached_tokens(overlap_blocks.get(w.worker_id, 0), block_size, prompt_len)
            return (prompt_len - cached + w.num_queued_tokens, *prefill_load_key(w))

        return min(workers, key=cost, default=None)

    def pick_from(
        self,
        candidates: PrefillCandidates,
        prompt_len: int,
        overlap_blocks: Mapping[str, float],
        block_size: int,
    ) -> WorkerView | None:
        """The workers that cache some of the prompt, costed one by one; of the others
        (cost: prompt_len + queued tokens) the first in load order is the cheapest. Each
        worker's key is pick's: (cost, *prefill_load_key), built in place (the router
        costs every worker caching the prompt on every request)."""
        best: WorkerView | None = None
        best_key: tuple[float, int, int, str] | None = None
        for w in candidates.among(overlap_blocks):
            cached = overlap_blocks[w.worker_id] * block_size
            if cached > prompt_len:
                cached = prompt_len
            queued = w.num_queued_tokens
            key = (prompt_len - cached + queued, queued, w.num_waiting, w.worker_id)
            if best_key is None or key < best_key:
                best, best_key = w, key
        for w in candidates.by_load():
            if w.worker_id in overlap_blocks:
                continue
            queued = w.num_queued_tokens
            if best_key is None or (prompt_len + queued, queued, w.num_waiting,
                                    w.worker_id) < best_key:
                best = w
            break
        return best


def make_prefill_policy(name: str) -> PrefillPolicy:
    policies: dict[str, type[PrefillPolicy]] = {
        "kv_aware": KvAwarePolicy,
        "round_robin": RoundRobinPolicy,
        "least_loaded": LeastLoadedPolicy,
    }
    if name not in policies:
        raise ValueError(f"unknown prefill policy {name!r}; expected one of {sorted(policies)}")
    return policies[name]()


# ---- the whole route -----------------------------------------------------------------------


class Route(NamedTuple):
    """Where one request goes: its decode worker, and its prefill worker (None: local).
    (A named tuple like WorkerView: routing builds a few per request.)"""

    decode: WorkerView
    prefill: WorkerView | None

    @property
    def prefill_locally(self) -> bool:
        return self.prefill is None


@dataclass(frozen=True)
class RoutingRules:
    """The knobs of `plan_route` (from RouterConfig)."""

    block_size: int = 16
    local_prefill_threshold: int = 32
    local_prefix_fraction: float = 0.75
    # A prompt block a worker holds in its host (disk) KV tier counts as this fraction of
    # one in its device prefix cache (weighted_overlap).
    host_block_weight: float = 0.75
    disk_block_weight: float = 0.5


def plan_route(
    decode: WorkerView,
    prefill_workers: Sequence[WorkerView],
    prompt_len: int,
    overlap_blocks: Mapping[str, float],
    rules: RoutingRules,
    policy: PrefillPolicy,
) -> Route:
    """Route a prompt whose decode worker is `decode`: prefill it there or on a worker
    `policy` picks among `prefill_workers` (the decode worker itself excluded: a colocated
    worker that decodes a request prefills it locally)."""
    others = [w for w in prefill_workers if w.worker_id != decode.worker_id]
    decode_cached = cached_tokens(
        overlap_blocks.get(decode.worker_id, 0), rules.block_size, prompt_len
    )
    if should_prefill_locally(
        prompt_len,
        decode_cached,
        bool(others),
        rules.local_prefill_threshold,
        rules.local_prefix_fraction,
    ):
        return Route(decode, None)
    return Route(decode, policy.pick(others, prompt_len, overlap_blocks, rules.block_size))


def plan_route_from(
    decode: WorkerView,
    candidates: PrefillCandidates | None,
    prompt_len: int,
    overlap_blocks: Mapping[str, float],
    rules: RoutingRules,
    policy: PrefillPolicy,
) -> Route:
    """plan_route over indexed candidates (which leave out `decode` itself; None: no
    prefill worker may be used)."""
    decode_cached = cached_tokens(
        overlap_blocks.get(decode.worker_id, 0), rules.block_size, prompt_len
    )
    if should_prefill_locally(
        prompt_len,
        decode_cached,
        candidates is not None and len(candidates) > 0,
        rules.local_prefill_threshold,
        rules.local_prefix_fraction,
    ):
        return Route(decode, None)
    assert candidates is not None
    return Route(decode, policy.pick_from(candidates, prompt_len, overlap_blocks,
                                          rules.block_size))
