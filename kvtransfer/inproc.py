"""In-process KV transfer: P and D live in one process and share an `InProcRegistry`.

`send_layer` packs the layer and hands the buffer straight to the receiving backend, which
scatters it into the reserved dst blocks (or stashes it until `expect()`), all in the
caller's thread. Handles are polled exactly like the network backend's, deadlines included.
"""

from __future__ import annotations

import threading

import torch

from splitserve.common.kv_layout import KVLayout, KVLayoutMismatch, check_compatible
from splitserve.kvtransfer._tables import ABORT, DATA, Incoming, RecvEntry, SendEntry, record_sent
from splitserve.kvtransfer.base import KVBackend


class InProcRegistry:
    """worker id -> open InProcBackend, for all workers of one process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._backends: dict[str, InProcBackend] = {}

    def add(self, backend: InProcBackend) -> None:
        with self._lock:
            if backend.worker_id in self._backends:
                raise ValueError(f"worker id {backend.worker_id!r} is already registered")
            self._backends[backend.worker_id] = backend

    def get(self, worker_id: str) -> InProcBackend | None:
        with self._lock:
            return self._backends.get(worker_id)

    def remove(self, backend: InProcBackend) -> None:
        with self._lock:
            if self._backends.get(backend.worker_id) is backend:
                del self._backends[backend.worker_id]


DEFAULT_REGISTRY = InProcRegistry()


class InProcBackend(KVBackend):
    """KV transfer between workers of one process (the single-machine stand-in)."""

    def __init__(
        self,
        worker_id: str,
        layout: KVLayout,
        registry: InProcRegistry | None = None,
        *,
        default_timeout_s: float = 30.0,
        stash_limit_bytes: int = 256 << 20,
    ) -> None:
        super().__init__(
            worker_id,
            layout,
            default_timeout_s=default_timeout_s,
            stash_limit_bytes=stash_limit_bytes,
        )
        self.registry = DEFAULT_REGISTRY if registry is None else registry
        self.registry.add(self)

    def close(self) -> None:
        super().close()
        self.registry.remove(self)

    def _peer(self, worker_id: str) -> tuple[InProcBackend | None, str | None]:
        """The peer backend, or None and why it cannot be used."""
        peer = self.registry.get(worker_id)
        if peer is None:
            return None, f"no in-process worker {worker_id!r}"
        try:
            check_compatible(
                self.layout, peer.layout, f"worker {self.worker_id!r}", f"worker {worker_id!r}"
            )
        except KVLayoutMismatch as exc:
            return None, str(exc)
        return peer, None

    def _open_send(self, entry: SendEntry) -> None:
        peer, why = self._peer(entry.handle.peer)
        if peer is None and self.registry.get(entry.handle.peer) is not None:
            self._fail_send(entry, why or "")  # layout mismatch: refuse on both sides

    def _submit(
        self, entry: SendEntry, layer: int, buffer: torch.Tensor, ready: torch.cuda.Event | None
    ) -> None:
        handle = entry.handle
        peer, why = self._peer(handle.peer)
        if peer is None:
            self._fail_send(entry, why or "")
            return
        if ready is not None:
            ready.synchronize()
        msg = Incoming(DATA, layer, handle.num_blocks, entry.dst_digest, buffer)
        peer._receive(self.worker_id, handle.key, msg)
        record_sent(handle, layer, msg.nbytes)

    def _open_recv(self, entry: RecvEntry) -> None:
        peer, why = self._peer(entry.handle.peer)
        if peer is None and self.registry.get(entry.handle.peer) is not None:
            entry.fail(why or "")

    def _notify_abort(self, entry: SendEntry, reason: str) -> None:
        peer, _ = self._peer(entry.handle.peer)
        if peer is not None:
            peer._receive(self.worker_id, entry.handle.key, Incoming(ABORT, reason=reason))

    def _fail_send(self, entry: SendEntry, message: str) -> None:
        entry.handle._fail(message)
        peer = self.registry.get(entry.handle.peer)
        if peer is not None:  # tell the receiver too, so both sides fail with the same reason
            peer._receive(self.worker_id, entry.handle.key, Incoming(ABORT, reason=message))
