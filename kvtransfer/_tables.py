"""Bookkeeping shared by the backends: per-transfer entries and the receiver's routing table.

A sender entry is keyed by (dst_worker, request_key), a receiver entry by (src_worker,
request_key). Data can reach a receiver before its `expect()` (the control plane tells P
and D in no fixed order); such data waits in a bounded stash until `expect()` claims it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from splitserve.kvtransfer._pack import unpack_layer
from splitserve.kvtransfer.state import KVTransfer

DATA = 1  # message kinds, shared with the wire header
ABORT = 2
ALL_LAYERS = -1  # a DATA message's layer when its buffer holds every layer, [L, 2, n, ...]


@dataclass(slots=True, eq=False)
class SendEntry:
    """Sender-side state of one transfer. `sent_any`/`abort_notified` belong to the backend
    thread that owns the pair connection."""

    handle: KVTransfer
    src_block_ids: list[int]
    dst_digest: int
    peer_endpoint: str | None = None  # the receiver's KV endpoint, when the caller knows it
    submitted: set[int] = field(default_factory=set)  # layers handed to the backend
    sent_any: bool = False
    # The connection its first message went over (SendPair's token): later messages go
    # over that one only (a receiver fails a transfer whose connection broke mid-way).
    connection: object | None = None
    abort_notified: bool = False
    _ids: dict[torch.device, torch.Tensor] = field(default_factory=dict)

    def ids_on(self, device: torch.device) -> torch.Tensor:
        """src block ids as int64 [n] on `device` (cached)."""
        ids = self._ids.get(device)
        if ids is None:
            ids = torch.tensor(self.src_block_ids, dtype=torch.long, device=device)
            self._ids[device] = ids
        return ids


@dataclass(slots=True, eq=False)
class RecvEntry:
    """Receiver-side state of one transfer: where each arriving layer is scattered.

    k_caches[l], v_caches[l]: [num_blocks, block_size, num_kv_heads, head_dim]; dst_ids:
    int64 [n] on the caches' device. `write_lock` (the handle's guard) is held while a layer
    is written into the caches and whenever the handle fails, so once a transfer is FAILED
    no write into its blocks is in progress or will ever start (the owner may then hand the
    blocks to another request).
    """

    handle: KVTransfer
    dst_ids: torch.Tensor
    dst_digest: int
    k_caches: list[torch.Tensor]
    v_caches: list[torch.Tensor]

    @property
    def write_lock(self) -> threading.RLock:
        assert self.handle._guard is not None, "receiver handles are guarded"
        return self.handle._guard

    def fail(self, message: str) -> bool:
        return self.handle._fail(message)


@dataclass(slots=True)
class Incoming:
    """One message for a receiver: a layer's packed blocks, or an abort from the sender."""

    kind: int
    layer: int = -1
    num_blocks: int = 0
    dst_digest: int = 0
    buffer: torch.Tensor | None = None  # [2, n, block_size, num_kv_heads, head_dim] or
    # [num_layers, 2, n, ...] when layer is ALL_LAYERS
    reason: str = ""

    @property
    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel() * self.buffer.element_size()


def record_sent(handle: KVTransfer, layer: int, nbytes: int) -> None:
    """A sender's message went out: one layer, or every layer (ALL_LAYERS)."""
    if layer != ALL_LAYERS:
        handle._record_layer(layer, nbytes)
        return
    for each in range(handle.num_layers):
        handle._record_layer(each, nbytes // handle.num_layers)


def deliver(entry: RecvEntry, msg: Incoming) -> None:
    """Apply one message to a receiver entry: scatter the layer into the dst blocks, or fail."""
    handle = entry.handle
    with entry.write_lock:
        if handle.poll().finished:
            return  # aborted or timed out: the blocks may belong to someone else by now
        if msg.kind == ABORT:
            handle._fail(f"sender {handle.peer!r} gave up on {handle.request_id!r}: {msg.reason}")
            return
        if msg.num_blocks != handle.num_blocks or msg.dst_digest != entry.dst_digest:
            what = (
                f"it sends {msg.num_blocks} blocks, {handle.num_blocks} are reserved here"
                if msg.num_blocks != handle.num_blocks
                else "it was given other dst block ids than the ones reserved here"
            )
            handle._fail(f"block mismatch for {handle.request_id!r} from {handle.peer!r}: {what}")
            return
        assert msg.buffer is not None
        if msg.layer == ALL_LAYERS:
            if msg.buffer.shape[0] != handle.num_layers:
                handle._fail(f"{msg.buffer.shape[0]} layers from {handle.peer!r}, "
                             f"{handle.num_layers} expected")
                return
            layers = [(layer, msg.buffer[layer]) for layer in range(handle.num_layers)]
        else:
            layers = [(msg.layer, msg.buffer)]
        for layer, data in layers:
            if not 0 <= layer < handle.num_layers or handle._has_layer(layer):
                continue  # duplicate or out of range: never written twice
            buffer = data.to(entry.k_caches[layer].device, non_blocking=False)
            unpack_layer(buffer, entry.k_caches[layer], entry.v_caches[layer], entry.dst_ids)
            if buffer.is_cuda:
                torch.cuda.current_stream(buffer.device).synchronize()
            handle._record_layer(layer, data.numel() * data.element_size())


class ReceiveTable:
    """(src_worker, request_key) -> RecvEntry, plus the early-data stash. Thread-safe."""

    def __init__(self, stash_limit_bytes: int, finished_ttl_s: float = 120.0) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, dict[int, RecvEntry]] = {}  # src -> request key -> entry
        self._stash: OrderedDict[tuple[str, int], tuple[float, list[Incoming]]] = OrderedDict()
        self._stash_bytes = 0
        self._stash_limit = stash_limit_bytes
        # keys of transfers that ended: late data for them is dropped, not stashed
        self._finished: OrderedDict[tuple[str, int], float] = OrderedDict()
        self._finished_ttl = finished_ttl_s

    def register(self, src: str, entry: RecvEntry) -> list[Incoming]:
        """Add an expectation; returns the messages that arrived before it, in order."""
        key = entry.handle.key
        with self._lock:
            by_key = self._entries.setdefault(src, {})
            old = by_key.get(key)
            if old is not None and not old.handle.state.finished:
                raise ValueError(f"already expecting {entry.handle.request_id!r} from {src!r}")
            by_key[key] = entry
            self._finished.pop((src, key), None)
            _, stashed = self._stash.pop((src, key), (0.0, []))
            self._stash_bytes -= sum(m.nbytes for m in stashed)
        return stashed

    def route(self, src: str, key: int, msg: Incoming) -> RecvEntry | None:
        """The live entry for this message, or None after stashing (or dropping) it."""
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(src, {}).get(key)
            if entry is not None and not entry.handle.state.finished:
                return entry
            if entry is not None:
                self._retire_locked(src, key, now)
            if (src, key) in self._finished:
                return None
            self._evict_stale_locked(now)
            if self._stash_bytes + msg.nbytes > self._stash_limit:
                return None  # over budget: dropped; that receiver will time out
            if msg.buffer is not None:
                msg.buffer = msg.buffer.clone()  # the caller's scratch buffer is reused
            _, items = self._stash.setdefault((src, key), (now, []))
            items.append(msg)
            self._stash_bytes += msg.nbytes
            return None

    def live(self, src: str | None = None) -> list[RecvEntry]:
        """Live entries (from `src` if given) after applying deadlines; retires the rest.
        Costs O(entries from src): the receiver thread calls it once per message."""
        now = time.monotonic()
        with self._lock:
            groups = [self._entries.get(src, {})] if src is not None else self._entries.values()
            entries = [(e.handle.peer, k, e) for g in groups for k, e in g.items()]
        alive = [entry for _, _, entry in entries if entry.handle.live_at(now)]
        if len(alive) < len(entries):
            with self._lock:
                for s, k, entry in entries:
                    if entry.handle.state.finished and self._entries.get(s, {}).get(k) is entry:
                        self._retire_locked(s, k, now)
        return alive

    def find(self, key: int) -> list[RecvEntry]:
        with self._lock:
            return [g[key] for g in self._entries.values() if key in g]

    def _retire_locked(self, src: str, key: int, now: float) -> None:
        by_key = self._entries.get(src, {})
        by_key.pop(key, None)
        if not by_key:
            self._entries.pop(src, None)
        self._finished[(src, key)] = now
        while self._finished and next(iter(self._finished.values())) < now - self._finished_ttl:
            self._finished.popitem(last=False)

    def _evict_stale_locked(self, now: float) -> None:
        # early data whose expect() never came within the TTL
        while self._stash:
            key, (born, items) = next(iter(self._stash.items()))
            if born >= now - self._finished_ttl:
                break
            self._stash.popitem(last=False)
            self._stash_bytes -= sum(m.nbytes for m in items)
