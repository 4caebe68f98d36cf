"""Polled transfer state machine and counters.

Life cycle of a transfer (one request, one direction, one handle):

    WAITING -> TRANSFERRING -> DONE
        \\            \\
         `-----------`-> FAILED   (error, abort, layout mismatch, or deadline passed)

The owner (a scheduler loop) only ever calls `poll()`, which never blocks. Backend threads
move the handle forward through the underscored methods. The deadline is enforced by
`poll()` itself, so a transfer whose peer vanished goes FAILED on time even when no backend
thread notices.
"""

from __future__ import annotations

import enum
import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

_MASK63 = (1 << 63) - 1


class TransferState(enum.Enum):
    WAITING = "waiting"  # registered; no layer moved yet (may be connecting)
    TRANSFERRING = "transferring"  # at least one layer moved
    DONE = "done"  # every layer moved (sender: sent; receiver: scattered into dst blocks)
    FAILED = "failed"  # terminal; `error` says why

    @property
    def finished(self) -> bool:
        return self in (TransferState.DONE, TransferState.FAILED)


class Direction(enum.Enum):
    SEND = "send"
    RECV = "recv"


def request_key(request_id: str) -> int:
    """Stable non-negative int64 for a request id, identical in every process (blake2b)."""
    digest = hashlib.blake2b(request_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


def block_ids_digest(block_ids: Sequence[int]) -> int:
    """Stable non-negative int64 over an ordered list of block ids. The sender puts the digest
    of the dst block ids it was told in every header, so the receiver can refuse data meant
    for other blocks than the ones it reserved (a control-plane mix-up)."""
    h = hashlib.blake2b(digest_size=8)
    for block_id in block_ids:
        h.update(int(block_id).to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little") & _MASK63


@dataclass(slots=True)
class TransferStats:
    """Counters of one backend. `seconds` sums the lifetimes of successful transfers."""

    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    transfers_ok: int = 0
    transfers_failed: int = 0

    def copy(self) -> TransferStats:
        return TransferStats(
            self.bytes_sent,
            self.bytes_received,
            self.seconds,
            self.transfers_ok,
            self.transfers_failed,
        )


class KVTransfer:
    """Handle of one request's KV moving in one direction between this worker and `peer`.

    `bytes` counts payload bytes of completed layers; `seconds` runs from creation to the
    terminal state (or to now while live).
    """

    __slots__ = (
        "request_id",
        "key",
        "peer",
        "direction",
        "num_layers",
        "num_blocks",
        "deadline",
        "_lock",
        "_state",
        "_error",
        "_layers",
        "_bytes",
        "_created",
        "_finished_at",
        "_on_finish",
        "_settling",
        "_guard",
        "_finished",
    )

    def __init__(
        self,
        request_id: str,
        peer: str,
        direction: Direction,
        num_layers: int,
        num_blocks: int,
        timeout_s: float,
        on_finish: Callable[[KVTransfer, TransferState], None] | None = None,
        guarded: bool = False,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.request_id = request_id
        self.key = request_key(request_id)
        self.peer = peer
        self.direction = direction
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self._created = time.monotonic()
        self.deadline = self._created + timeout_s  # time.monotonic() seconds
        self._lock = threading.Lock()
        self._state = TransferState.WAITING
        self._error: str | None = None
        self._layers: set[int] = set()
        self._bytes = 0
        self._finished_at: float | None = None
        # Called with the terminal state before anyone can see it (poll, state, wait): the
        # backend's statistics then count every transfer its owner saw finish.
        self._on_finish = on_finish
        self._settling = False  # terminal, being published (_settle)
        self._finished = threading.Event()  # set once DONE or FAILED
        # Receivers: held by the backend while it writes a layer into the dst blocks, and by
        # _fail, so a FAILED transfer never has a write in progress (its blocks may be freed).
        self._guard = threading.RLock() if guarded else None

    # -- owner side: never waits on the network. (A receiver's poll() that fails it at the
    # deadline first waits for a layer copy already in progress into its dst blocks.)

    def poll(self) -> TransferState:
        """Current state; a live transfer past its deadline turns FAILED here."""
        with self._lock:
            state = self._state
        if not state.finished and time.monotonic() > self.deadline:
            self._fail(
                f"timed out after {self.deadline - self._created:.1f}s "
                f"({self.direction.value} {self.request_id!r}, peer {self.peer!r}, "
                f"{len(self._layers)}/{self.num_layers} layers done)"
            )
            with self._lock:
                state = self._state
        return state

    def wait(self, timeout_s: float | None = None) -> TransferState:
        """Block (an RPC thread, never a scheduler loop) until the transfer finishes, its
        deadline passes, or `timeout_s` elapses; the state then. Sleeps on an event rather
        than polling, so many waiters cost the backend threads no CPU."""
        limit = self.remaining_s() if timeout_s is None else min(timeout_s, self.remaining_s())
        self._finished.wait(max(0.0, limit))
        return self.poll()

    def live_at(self, now: float) -> bool:
        """Cheap liveness check for backend loops: applies the deadline like poll()."""
        if self._state.finished:  # a plain attribute read: no lock needed to look
            return False
        return now <= self.deadline or not self.poll().finished

    @property
    def state(self) -> TransferState:
        """State without the deadline check (use `poll()` in scheduler loops)."""
        with self._lock:
            return self._state

    @property
    def error(self) -> str | None:
        with self._lock:
            return self._error

    @property
    def layers_done(self) -> int:
        with self._lock:
            return len(self._layers)

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._bytes

    @property
    def seconds(self) -> float:
        with self._lock:
            end = self._finished_at if self._finished_at is not None else time.monotonic()
        return end - self._created

    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()

    def __repr__(self) -> str:
        return (
            f"KVTransfer({self.direction.value} {self.request_id!r} peer={self.peer!r} "
            f"{self.state.value} {self.layers_done}/{self.num_layers})"
        )

    # -- backend side -------------------------------------------------------------------

    def _has_layer(self, layer: int) -> bool:
        with self._lock:
            return layer in self._layers

    def _record_layer(self, layer: int, nbytes: int) -> bool:
        """Mark `layer` moved. Returns False (and records nothing) if already terminal."""
        with self._lock:
            if self._state.finished or self._settling or layer in self._layers:
                return False
            self._layers.add(layer)
            self._bytes += nbytes
            if len(self._layers) < self.num_layers:
                self._state = TransferState.TRANSFERRING
                return True
            self._settling = True
            self._finished_at = time.monotonic()
        self._settle(TransferState.DONE)
        return True

    def _fail(self, message: str) -> bool:
        """Move to FAILED with `message`; False if it was already terminal."""
        if self._guard is not None:
            with self._guard:
                return self._fail_unguarded(message)
        return self._fail_unguarded(message)

    def _fail_unguarded(self, message: str) -> bool:
        with self._lock:
            if self._state.finished or self._settling:
                return False
            self._settling = True
            self._error = message
            self._finished_at = time.monotonic()
        self._settle(TransferState.FAILED)
        return True

    def _settle(self, state: TransferState) -> None:
        """Publish a terminal state decided under the lock: first the backend's callback
        (its statistics), outside the lock, then the state and the waiters, so that whoever
        sees the transfer finished also sees it counted; they see it even if the callback
        raised."""
        try:
            if self._on_finish is not None:
                self._on_finish(self, state)
        finally:
            with self._lock:
                self._state = state
            self._finished.set()


TransferHandle = KVTransfer  # the name the design notes use
