"""The backend interface the engine programs against, and the logic every backend shares.

Sender (prefill worker P), per request:
    h = backend.start_send(request_id, dst_worker, src_block_ids, dst_block_ids)
    for each layer l, right after layer l's KV is stored:
        backend.send_layer(h, l, k_caches[l], v_caches[l])   # packs, hands off, returns
    poll h until DONE (then P may free the src blocks) or FAILED
Receiver (decode worker D), per request:
    h = backend.expect(request_id, src_worker, dst_block_ids, k_caches, v_caches, timeout_s)
    poll h until DONE (every layer scattered into the dst blocks) or FAILED

Nothing here blocks on the network: `send_layer` copies the layer's blocks into a fresh
buffer and queues it; `expect` registers the destination; `poll` reads state. Once a
receiver handle is FAILED (deadline, abort, error) the backend never writes into its dst
blocks again, so the owner may free them.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Sequence

import torch

from splitserve.common.kv_layout import KVLayout
from splitserve.kvtransfer._pack import pack_layer
from splitserve.kvtransfer._tables import (
    ALL_LAYERS,
    Incoming,
    ReceiveTable,
    RecvEntry,
    SendEntry,
    deliver,
)
from splitserve.kvtransfer.state import (
    Direction,
    KVTransfer,
    TransferState,
    TransferStats,
    block_ids_digest,
    request_key,
)


def _check_block_ids(name: str, ids: Sequence[int], num_blocks: int | None = None) -> list[int]:
    out = [int(i) for i in ids]
    if not out:
        raise ValueError(f"{name} is empty: a transfer moves at least one block")
    if len(set(out)) != len(out):
        raise ValueError(f"{name} has repeated block ids: {out}")
    if min(out) < 0 or (num_blocks is not None and max(out) >= num_blocks):
        raise ValueError(f"{name} out of range [0, {num_blocks}): {out}")
    return out


class KVBackend(abc.ABC):
    """A worker's KV transfer endpoint (both directions). Thread-safe."""

    def __init__(
        self,
        worker_id: str,
        layout: KVLayout,
        *,
        default_timeout_s: float = 30.0,
        stash_limit_bytes: int = 256 << 20,
    ) -> None:
        self.worker_id = worker_id
        self.layout = layout
        self.default_timeout_s = default_timeout_s
        self._lock = threading.RLock()  # RLock: handle callbacks (_count) may run under it
        self._stats = TransferStats()
        self._sends: dict[tuple[str, int], SendEntry] = {}
        self._recv = ReceiveTable(stash_limit_bytes)
        self._closed = False

    # -- sender -------------------------------------------------------------------------

    def start_send(
        self,
        request_id: str,
        dst_worker: str,
        src_block_ids: Sequence[int],
        dst_block_ids: Sequence[int],
        num_layers: int | None = None,
        *,
        timeout_s: float | None = None,
        peer_endpoint: str | None = None,
    ) -> KVTransfer:
        """Register the transfer of `request_id`'s blocks to `dst_worker`. Never blocks.
        `peer_endpoint`: the receiver's published KV endpoint (where its side of the
        connection rendezvous); backends that need none ignore it."""
        self._check_open()
        src = _check_block_ids("src_block_ids", src_block_ids)
        dst = _check_block_ids("dst_block_ids", dst_block_ids)
        if len(src) != len(dst):
            raise ValueError(f"{len(src)} src blocks but {len(dst)} dst blocks")
        layers = self.layout.num_layers if num_layers is None else num_layers
        if layers != self.layout.num_layers:
            raise ValueError(f"num_layers {layers} != layout.num_layers {self.layout.num_layers}")
        handle = self._new_handle(request_id, dst_worker, Direction.SEND, len(src), timeout_s)
        entry = SendEntry(handle, src, block_ids_digest(dst), peer_endpoint)
        with self._lock:
            old = self._sends.get((dst_worker, handle.key))
            if old is not None and not old.handle.poll().finished:
                raise ValueError(f"already sending {request_id!r} to {dst_worker!r}")
            self._sends = {k: e for k, e in self._sends.items() if not e.handle.state.finished}
            self._sends[(dst_worker, handle.key)] = entry
        self._open_send(entry)
        return handle

    def send_layer(
        self, handle: KVTransfer, layer: int, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> None:
        """Send layer `layer` of the request's src blocks. k_cache, v_cache: this layer's
        [num_blocks, block_size, num_kv_heads, head_dim]. Copies the blocks before returning
        (the caller may overwrite them afterwards); a finished handle makes this a no-op."""
        if handle.poll().finished:
            return
        entry = self._send_entry(handle)
        if not 0 <= layer < handle.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {handle.num_layers})")
        if layer in entry.submitted:
            raise ValueError(f"layer {layer} of {handle.request_id!r} was already sent")
        self._pack_and_submit(entry, layer, [(k_cache, v_cache)])

    def send_all_layers(
        self, handle: KVTransfer, k_caches: Sequence[torch.Tensor], v_caches: Sequence[torch.Tensor]
    ) -> None:
        """Send every layer of the request's src blocks as one message: for KV that is all
        computed already (a migrating request), where one message per layer would only add
        round trips. Copies the blocks before returning; a finished handle makes this a
        no-op."""
        if handle.poll().finished:
            return
        entry = self._send_entry(handle)
        if entry.submitted:
            raise ValueError(f"layers {sorted(entry.submitted)} of {handle.request_id!r} "
                             "were already sent one by one")
        if len(k_caches) != handle.num_layers or len(v_caches) != handle.num_layers:
            raise ValueError(f"need {handle.num_layers} K and V caches, "
                             f"got {len(k_caches)}/{len(v_caches)}")
        self._pack_and_submit(entry, ALL_LAYERS, list(zip(k_caches, v_caches, strict=True)))

    def _pack_and_submit(self, entry: SendEntry, layer: int,
                         caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy the src blocks of `caches` (one (K, V) per layer sent) into one fresh buffer,
        [2, n, ...] for one layer or [L, 2, n, ...] for ALL_LAYERS, and queue it."""
        for k, v in caches:
            self._check_caches(k, v)
            if max(entry.src_block_ids) >= k.shape[0]:
                raise ValueError(
                    f"src block ids {entry.src_block_ids} beyond a {k.shape[0]}-block pool"
                )
        handle, first = entry.handle, caches[0][0]
        entry.submitted.update(range(handle.num_layers) if layer == ALL_LAYERS else [layer])
        shape = (2, handle.num_blocks, *self.layout.block_shape)
        buffer = torch.empty((len(caches), *shape), dtype=first.dtype, device=first.device)
        ids = entry.ids_on(first.device)
        for i, (k, v) in enumerate(caches):
            pack_layer(k, v, ids, buffer[i])
        if layer != ALL_LAYERS:
            buffer = buffer[0]
        ready: torch.cuda.Event | None = None
        if buffer.is_cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(buffer.device))
        self._submit(entry, layer, buffer, ready)

    # -- receiver -----------------------------------------------------------------------

    def expect(
        self,
        request_id: str,
        src_worker: str,
        dst_block_ids: Sequence[int],
        k_caches: Sequence[torch.Tensor],
        v_caches: Sequence[torch.Tensor],
        timeout_s: float | None = None,
    ) -> KVTransfer:
        """Receive `request_id`'s KV from `src_worker` into blocks `dst_block_ids` of the
        caches (one [num_blocks, block_size, num_kv_heads, head_dim] K and V per layer).
        Never blocks on the network."""
        self._check_open()
        if len(k_caches) != self.layout.num_layers or len(v_caches) != self.layout.num_layers:
            raise ValueError(
                f"need {self.layout.num_layers} K and V caches, got {len(k_caches)}/{len(v_caches)}"
            )
        for k, v in zip(k_caches, v_caches, strict=True):
            self._check_caches(k, v)
        dst = _check_block_ids("dst_block_ids", dst_block_ids, k_caches[0].shape[0])
        handle = self._new_handle(request_id, src_worker, Direction.RECV, len(dst), timeout_s)
        ids = torch.tensor(dst, dtype=torch.long, device=k_caches[0].device)
        entry = RecvEntry(handle, ids, block_ids_digest(dst), list(k_caches), list(v_caches))
        early = self._recv.register(src_worker, entry)
        for msg in early:
            deliver(entry, msg)
        self._open_recv(entry)
        return handle

    # -- both ---------------------------------------------------------------------------

    def poll(self, handle: KVTransfer) -> TransferState:
        return handle.poll()

    def abort(self, request_id: str, reason: str = "aborted") -> int:
        """Fail every live transfer of `request_id` (both directions); tell senders' peers
        when possible. Returns how many were live. On return no write into a receiver's
        dst blocks is in progress."""
        key = request_key(request_id)
        count = 0
        with self._lock:
            sends = [e for (_, k), e in self._sends.items() if k == key]
        for entry in sends:
            if entry.handle._fail(f"{reason} (send {request_id!r} to {entry.handle.peer!r})"):
                count += 1
                self._notify_abort(entry, reason)
        for rentry in self._recv.find(key):
            if rentry.fail(f"{reason} (recv {request_id!r} from {rentry.handle.peer!r})"):
                count += 1
        return count

    def stats(self) -> TransferStats:
        with self._lock:
            return self._stats.copy()

    def close(self) -> None:
        """Fail every live transfer and release connections and threads."""
        with self._lock:
            self._closed = True
            sends = list(self._sends.values())
        for entry in sends:
            entry.handle._fail("backend closed")
        for rentry in self._recv.live():
            rentry.fail("backend closed")

    def __enter__(self) -> KVBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- for subclasses -----------------------------------------------------------------

    @abc.abstractmethod
    def _open_send(self, entry: SendEntry) -> None:
        """A send transfer was registered (e.g. start the pair's sender thread)."""

    @abc.abstractmethod
    def _submit(
        self, entry: SendEntry, layer: int, buffer: torch.Tensor, ready: torch.cuda.Event | None
    ) -> None:
        """Move one packed layer [2, n, block_size, num_kv_heads, head_dim] to the peer.
        On CUDA `ready` marks when the pack is complete on the packing stream."""

    @abc.abstractmethod
    def _open_recv(self, entry: RecvEntry) -> None:
        """A receive transfer was registered (e.g. wake the pair's receiver thread)."""

    @abc.abstractmethod
    def _notify_abort(self, entry: SendEntry, reason: str) -> None:
        """Best effort: tell the receiver that this send was given up."""

    def _receive(self, src: str, key: int, msg: Incoming) -> None:
        """Route a message that arrived from `src` to its expectation (or the stash)."""
        entry = self._recv.route(src, key, msg)
        if entry is not None:
            try:
                deliver(entry, msg)
            except Exception as exc:  # noqa: BLE001 - fail this transfer, keep the backend
                entry.fail(f"could not store KV from {src!r}: {exc!r}")

    def _new_handle(
        self, request_id: str, peer: str, direction: Direction, n: int, timeout_s: float | None
    ) -> KVTransfer:
        timeout = self.default_timeout_s if timeout_s is None else timeout_s
        return KVTransfer(
            request_id,
            peer,
            direction,
            self.layout.num_layers,
            n,
            timeout,
            self._count,
            guarded=direction is Direction.RECV,
        )

    def _count(self, handle: KVTransfer, state: TransferState) -> None:
        with self._lock:
            if state is TransferState.DONE:
                self._stats.transfers_ok += 1
                self._stats.seconds += handle.seconds
                if handle.direction is Direction.SEND:
                    self._stats.bytes_sent += handle.bytes
                else:
                    self._stats.bytes_received += handle.bytes
            else:
                self._stats.transfers_failed += 1

    def _send_entry(self, handle: KVTransfer) -> SendEntry:
        with self._lock:
            entry = self._sends.get((handle.peer, handle.key))
        if entry is None or entry.handle is not handle:
            raise ValueError(f"{handle!r} is not a live send of this backend")
        return entry

    def _check_caches(self, k: torch.Tensor, v: torch.Tensor) -> None:
        want = self.layout.block_shape
        if k.dim() != 4 or tuple(k.shape[1:]) != want or k.shape != v.shape:
            shape = ", ".join(map(str, want))
            raise ValueError(
                f"caches must be [num_blocks, {shape}], got {tuple(k.shape)} / {tuple(v.shape)}"
            )
        if k.dtype != self.layout.torch_dtype or v.dtype != k.dtype:
            raise ValueError(f"caches must be {self.layout.dtype}, got {k.dtype} / {v.dtype}")
        if k.device != v.device:
            raise ValueError(f"K and V caches on different devices: {k.device} / {v.device}")

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"KV backend of {self.worker_id!r} is closed")
