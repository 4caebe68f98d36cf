"""The cluster's records: who a worker is, its load, and where a request is in its life.

Plain frozen dataclasses (torch-free, no I/O). They sit in the bottom layer because the
cluster store, the router, the workers and the proto conversion (`splitserve.common.convert
.cluster`) all speak them; the store interface itself is `splitserve.cluster.store`.
Times are seconds since the Unix epoch, stamped by whoever built the object.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from enum import Enum

from splitserve.common.step_time import StepTimeModel


class WorkerRole(str, Enum):
    """What a worker does; values are the wire/storage spelling."""

    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"

    def can_serve(self, wanted: WorkerRole) -> bool:
        """True when a worker of this role can play `wanted` (a BOTH worker plays either)."""
        return self is wanted or (self is WorkerRole.BOTH and wanted is not WorkerRole.BOTH)


class WorkerIdUnion(AbstractSet[str]):
    """The worker ids in any of a few sets, kept apart: the scope of a prefix-overlap lookup
    (the router's prefill workers and the decode workers it ranked) without copying the
    large set into a new one for every lookup. The parts are read, never changed."""

    __slots__ = ("parts",)

    def __init__(self, *parts: AbstractSet[str]) -> None:
        self.parts = parts

    def __contains__(self, worker_id: object) -> bool:
        return any(worker_id in part for part in self.parts)

    def __iter__(self) -> Iterator[str]:
        return iter(set().union(*self.parts))

    def __len__(self) -> int:
        return len(set().union(*self.parts))


def ids_within(worker_ids: set[str], among: AbstractSet[str]) -> set[str]:
    """`worker_ids & among`, in C set operations for a set, a frozenset or a WorkerIdUnion of
    them (else by asking `among` about each id)."""
    if isinstance(among, WorkerIdUnion):
        return set().union(*(ids_within(worker_ids, part) for part in among.parts))
    if isinstance(among, (set, frozenset)):
        return worker_ids & among
    return {wid for wid in worker_ids if wid in among}


class RequestPhase(str, Enum):
    """Where a request is in its life, as recorded in the ledger."""

    QUEUED = "queued"  # accepted by the router; no worker holds anything yet
    ADMITTED = "admitted"  # the decode worker reserved its blocks
    PREFILLING = "prefilling"  # a prefill worker computes the prompt and sends its KV
    DECODING = "decoding"  # the decode worker generates tokens
    FINISHED = "finished"  # done; the entry is about to be deleted


def _check_non_negative(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be an int >= 0, got {value!r}")


@dataclass(frozen=True)
class WorkerInfo:
    """A worker's static facts, fixed at registration."""

    worker_id: str
    role: WorkerRole
    address: str  # host:port of the worker's gRPC server
    model: str
    block_size: int  # tokens per KV block
    num_total_blocks: int  # KV blocks in the worker's cache
    kv_endpoint: str = ""  # KV transfer endpoint; opaque here (kvtransfer's format)
    started_at: float = field(default_factory=time.time)
    # Where a decode worker accepts routers' output channels (host:port; "": it does not).
    output_endpoint: str = ""

    def __post_init__(self) -> None:
        if not self.worker_id:
            raise ValueError("WorkerInfo.worker_id must not be empty")
        object.__setattr__(self, "role", WorkerRole(self.role))
        if self.block_size <= 0:
            raise ValueError(f"WorkerInfo.block_size must be > 0, got {self.block_size}")
        _check_non_negative(self, "num_total_blocks")


@dataclass(frozen=True)
class WorkerLoadReport:
    """A worker's load as its scheduler saw it at `updated_at`."""

    num_waiting: int = 0  # requests waiting to be scheduled
    num_running: int = 0  # requests in the running batch
    num_free_blocks: int = 0  # KV blocks free for new requests
    num_queued_tokens: int = 0  # prompt tokens waiting to be prefilled
    updated_at: float = field(default_factory=time.time)
    step_model: StepTimeModel | None = None  # its engine's step times (None: not yet known)

    def __post_init__(self) -> None:
        _check_non_negative(
            self, "num_waiting", "num_running", "num_free_blocks", "num_queued_tokens"
        )
        if self.step_model is not None and not self.step_model.is_finite():
            # NaN or inf (a fit gone wrong, a corrupt store entry): its predictions would be
            # too, so the report carries no model, however it was made or decoded.
            object.__setattr__(self, "step_model", None)


@dataclass(frozen=True)
class RequestLedgerEntry:
    """Which workers hold a request's KV blocks, and how far the request got."""

    request_id: str
    phase: RequestPhase
    prefill_worker_id: str = ""  # empty: no prefill worker (queued, or prefilled on D)
    decode_worker_id: str = ""  # empty: not admitted yet
    num_prompt_tokens: int = 0
    num_prefill_blocks: int = 0  # KV blocks held on the prefill worker
    num_decode_blocks: int = 0  # KV blocks held on the decode worker
    num_generated_tokens: int = 0  # the first token (sampled by P) included
    updated_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if not self.request_id:
            raise ValueError("RequestLedgerEntry.request_id must not be empty")
        object.__setattr__(self, "phase", RequestPhase(self.phase))
        _check_non_negative(
            self,
            "num_prompt_tokens",
            "num_prefill_blocks",
            "num_decode_blocks",
            "num_generated_tokens",
        )

    def names_worker(self, worker_id: str) -> bool:
        return worker_id in (self.prefill_worker_id, self.decode_worker_id)


# Where a worker holds a KV block, fastest first: its device pool (the prefix cache), its
# host-memory tier, its disk tier (engine/kv_tier.py).
KV_TIERS = ("device", "host", "disk")


@dataclass(frozen=True, slots=True)
class PrefixOverlap:
    """A worker's leading run of a prompt's full blocks, by the tier each block of the run
    is found in (the fastest that holds it)."""

    device_blocks: int = 0
    host_blocks: int = 0
    disk_blocks: int = 0

    @property
    def num_blocks(self) -> int:
        return self.device_blocks + self.host_blocks + self.disk_blocks

    def weighted(self, host_weight: float, disk_weight: float) -> float:
        """The run in device-block equivalents: a host (disk) block weighs `host_weight`
        (`disk_weight`) of a device block (router.policy.RoutingRules)."""
        return self.device_blocks + host_weight * self.host_blocks + disk_weight * self.disk_blocks
