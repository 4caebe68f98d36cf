"""The two background threads of the torch.distributed backend, one per ordered pair.

SendPair (this worker -> dst): drains a FIFO of packed layers; per message it sends the
header then the payload and waits for both (each wait bounded by the transfer's deadline).
RecvPair (src -> this worker): while any transfer from src is expected, receives a header,
then its payload into a reused scratch buffer, and routes it (scatter into the dst blocks,
or stash until expect()). It posts no receive while nothing is expected, so an idle pair
never times out.

Failure rules, the same on both sides: any error or timeout on a connection closes it
(gloo closes a pair on timeout anyway) and the next use reconnects in a new epoch. A
transfer that already moved data over the broken connection fails, on the sender as on the
receiver, whichever transfer's message found the break (the sender never sends a
transfer's later layers over a newer connection: it would call DONE what the receiver
failed); one that moved nothing yet carries over to the next connection (the sender
retries its first message once).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch

from splitserve.common.kv_layout import KVLayoutMismatch
from splitserve.kvtransfer._rendezvous import PairLink
from splitserve.kvtransfer._tables import ABORT, ALL_LAYERS, DATA, Incoming, SendEntry, record_sent
from splitserve.kvtransfer._wire import HEADER_LEN, REASON_FAILED, Header

if TYPE_CHECKING:
    from splitserve.kvtransfer.torch_dist import TorchDistBackend

logger = logging.getLogger(__name__)


def _timeout(deadline: float, cap_s: float) -> timedelta:
    return timedelta(seconds=max(0.001, min(cap_s, deadline - time.monotonic())))


CONNECT = 0  # queue-only message kind: connect now, so the handshake overlaps compute


@dataclass(slots=True, eq=False)
class Outgoing:
    entry: SendEntry
    kind: int
    layer: int = -1
    buffer: torch.Tensor | None = None  # [2, n, block_size, num_kv_heads, head_dim]
    ready: torch.cuda.Event | None = None
    reason: int = 0
    retried: bool = False


class _PairThread:
    def __init__(
        self, backend: TorchDistBackend, peer: str, role: str, store_addr: tuple[str, int]
    ) -> None:
        self.backend = backend
        self.peer = peer
        src, dst = (backend.worker_id, peer) if role == "send" else (peer, backend.worker_id)
        self.link = PairLink(
            store_addr,
            f"{backend.namespace}/{src}->{dst}",
            role,
            backend.layout,
            (backend.worker_id, peer),
            backend.device,
            backend.bind_host,
            backend.auth_token,
        )
        self.cv = threading.Condition()
        self.stopped = False
        self.stream = torch.cuda.Stream(backend.device) if backend.device.type == "cuda" else None
        self.thread = threading.Thread(
            target=self._main, name=f"kv-{role}-{src}->{dst}", daemon=True
        )
        self.thread.start()

    def stop(self, reason: str | None = None) -> None:
        with self.cv:
            self.stopped = True
            self.cv.notify_all()

    def _main(self) -> None:
        try:
            if self.stream is not None:
                with torch.cuda.stream(self.stream):
                    self._run()
            else:
                self._run()
        finally:
            self.link.teardown()

    def _run(self) -> None:
        raise NotImplementedError


class SendPair(_PairThread):
    def __init__(self, backend: TorchDistBackend, dst: str, store_addr: tuple[str, int]) -> None:
        self.queue: collections.deque[Outgoing] = collections.deque()
        self.header = torch.empty(HEADER_LEN, dtype=torch.int64, device=backend.device)
        self._connection = object()  # a new token each time the connection breaks
        super().__init__(backend, dst, "send", store_addr)

    def stop(self, reason: str | None = None) -> None:
        """Stop the thread; with a reason, fail every transfer still queued here."""
        super().stop()
        if reason is None:
            return
        with self.cv:
            queued, self.queue = list(self.queue), collections.deque()
        for msg in queued:
            msg.entry.handle._fail(reason)

    def put(self, msg: Outgoing, front: bool = False) -> None:
        with self.cv:
            if front:
                self.queue.appendleft(msg)
            else:
                self.queue.append(msg)
            self.cv.notify()

    def _run(self) -> None:
        while True:
            with self.cv:
                while not self.queue and not self.stopped:
                    self.cv.wait()
                if self.stopped:
                    return
                msg = self.queue.popleft()
            try:
                self._one(msg)
            except Exception as exc:  # noqa: BLE001 - a bug must not kill the pair's thread
                logger.exception("kv send to %s: unexpected error", self.peer)
                self._broken()
                msg.entry.handle._fail(f"internal error sending to {self.peer!r}: {exc!r}")

    def _one(self, msg: Outgoing) -> None:
        entry, handle = msg.entry, msg.entry.handle
        if msg.kind == ABORT:
            if not entry.abort_notified:
                self._abort_notice(entry, msg.reason)
            return
        if handle.poll().finished:
            if msg.kind == DATA and entry.sent_any and not entry.abort_notified:
                self._abort_notice(entry, REASON_FAILED)
            return
        if entry.sent_any and entry.connection is not self._connection:
            # Its earlier layers went over a connection that broke since: the receiver
            # failed it (they may be lost), so it cannot complete over a new one.
            handle._fail(f"lost connection to worker {self.peer!r} mid-transfer")
            return
        if not self.link.connected and not self._connect(msg):
            return
        if msg.kind == CONNECT:
            return
        try:
            self._send_data(msg)
        except Exception as exc:  # noqa: BLE001 - the connection is gone either way
            self._broken()
            if not entry.sent_any and not msg.retried:
                msg.retried = True
                self.put(msg, front=True)  # nothing of it went out: retry on a new connection
                return
            self._fail_all(
                msg, f"lost connection to worker {self.peer!r}: {exc}", only_started=True
            )

    def _broken(self) -> None:
        """Close the connection; transfers that sent part of themselves over it fail when
        their next message comes (or now, if queued: _fail_all)."""
        self.link.teardown()
        self._connection = object()

    def _connect(self, msg: Outgoing) -> bool:
        handle = msg.entry.handle
        try:
            self.link.connect(handle.deadline, lambda: not handle.state.finished)
            return True
        except KVLayoutMismatch as exc:
            self._fail_all(msg, str(exc), only_started=False)
        except Exception as exc:  # noqa: BLE001 - timeout, store or backend error
            handle._fail(f"could not connect to worker {self.peer!r}: {exc}")
        return False

    def _send_data(self, msg: Outgoing) -> None:
        entry, handle = msg.entry, msg.entry.handle
        assert msg.buffer is not None
        payload = msg.buffer.reshape(-1).view(torch.uint8)
        header = Header(
            DATA, handle.key, msg.layer, handle.num_blocks, entry.dst_digest, payload.numel()
        )
        if msg.ready is not None:
            torch.cuda.current_stream(payload.device).wait_event(msg.ready)
        cap = self.backend.op_timeout_s
        group = self.link.group
        group.send([header.encode(self.header)], 1, 0).wait(_timeout(handle.deadline, cap))
        entry.sent_any = True
        entry.connection = self._connection
        group.send([payload], 1, 0).wait(_timeout(handle.deadline, cap))
        msg.buffer = None
        record_sent(handle, msg.layer, payload.numel())

    def _abort_notice(self, entry: SendEntry, reason: int) -> None:
        """Best effort, only over an open connection: tell the receiver to give up now."""
        entry.abort_notified = True
        if not self.link.connected:
            return
        header = Header(ABORT, entry.handle.key, reason=reason)
        try:
            self.link.group.send([header.encode(self.header)], 1, 0).wait(timedelta(seconds=1))
        except Exception:  # noqa: BLE001
            self._broken()

    def _fail_all(self, msg: Outgoing, error: str, only_started: bool) -> None:
        """Fail msg's transfer and every queued transfer on this pair (that already sent
        something over the broken connection, if only_started)."""
        msg.entry.handle._fail(error)
        with self.cv:
            queued = list(self.queue)
        for other in queued:
            if not only_started or other.entry.sent_any:
                other.entry.handle._fail(error)


class RecvPair(_PairThread):
    def __init__(self, backend: TorchDistBackend, src: str, store_addr: tuple[str, int]) -> None:
        self.header = torch.empty(HEADER_LEN, dtype=torch.int64, device=backend.device)
        self.scratch = torch.empty(0, dtype=torch.uint8, device=backend.device)
        super().__init__(backend, src, "recv", store_addr)

    def wake(self) -> None:
        with self.cv:
            self.cv.notify()

    def _run(self) -> None:
        table = self.backend._recv
        while not self.stopped:
            live = table.live(self.peer)
            if not live:
                with self.cv:
                    if not self.stopped:
                        self.cv.wait(timeout=1.0)
                continue
            deadline = max(e.handle.deadline for e in live)
            if not self.link.connected and not self._connect(deadline):
                continue
            try:
                header, msg = self._receive(deadline)
            except Exception as exc:  # noqa: BLE001 - timeout, peer died, bad header
                logger.warning("kv recv from %s: connection closed: %s", self.peer, exc)
                self.link.teardown()
                for entry in table.live(self.peer):
                    if entry.handle.layers_done > 0:
                        entry.fail(f"lost connection to worker {self.peer!r}: {exc}")
                continue
            self.backend._receive(self.peer, header.request_key, msg)

    def _connect(self, deadline: float) -> bool:
        table = self.backend._recv
        try:
            self.link.connect(deadline, lambda: bool(table.live(self.peer)) and not self.stopped)
            return True
        except KVLayoutMismatch as exc:
            for entry in table.live(self.peer):
                entry.fail(str(exc))
        except Exception as exc:  # noqa: BLE001 - the store is unreachable, etc.
            now = time.monotonic()
            if now < deadline and table.live(self.peer):
                time.sleep(0.05)  # deadline not reached: not a timeout, retry later
            else:  # those whose own time ran out (expects that came since have more)
                for entry in table.live(self.peer):
                    if entry.handle.deadline <= now:
                        entry.fail(f"could not connect to worker {self.peer!r}: {exc}")
        return False

    def _receive(self, deadline: float) -> tuple[Header, Incoming]:
        group = self.link.group
        group.recv([self.header], 0, 0).wait(_timeout(deadline, 1e9))
        header = Header.decode(self.header)
        if header.kind == ABORT:
            return header, Incoming(ABORT, reason=header.reason_text)
        layout = self.backend.layout
        layers = layout.num_layers if header.layer == ALL_LAYERS else 1
        expected = header.num_blocks * layout.bytes_per_block_per_layer * layers
        if header.payload_nbytes != expected:
            raise ValueError(f"payload of {header.payload_nbytes} bytes, expected {expected}")
        if self.scratch.numel() < expected:
            self.scratch = torch.empty(expected, dtype=torch.uint8, device=self.backend.device)
        payload = self.scratch[:expected]
        op_deadline = time.monotonic() + self.backend.op_timeout_s
        group.recv([payload], 0, 0).wait(_timeout(op_deadline, self.backend.op_timeout_s))
        shape: tuple[int, ...] = (2, header.num_blocks, *layout.block_shape)
        if header.layer == ALL_LAYERS:
            shape = (layers, *shape)
        buffer = payload.view(layout.torch_dtype).view(shape)
        return header, Incoming(DATA, header.layer, header.num_blocks, header.dst_digest, buffer)
