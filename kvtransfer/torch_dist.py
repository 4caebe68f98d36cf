"""KV transfer over torch.distributed point-to-point: gloo on CPU, NCCL on CUDA.

Threading model (see _pairs.py for the failure rules):
  * caller threads (model runner, scheduler loop): start_send / send_layer / expect / poll /
    abort. send_layer packs the layer's blocks into a fresh buffer on the caller's thread
    (and stream) and queues it; nothing here waits for the network.
  * one SendPair thread per destination worker, one RecvPair thread per source worker,
    created on first use. Each owns its pair's 2-rank process group (built lazily through
    the rendezvous store, after a KVLayout handshake) and is the only thread using it.

Messages on a pair: for each (request, layer) one int64 header and one payload holding all
the request's blocks of that layer (see _wire.py). One message per block would be about
40x slower on loopback.

Where a pair meets: at the rendezvous store named in the *receiver's* endpoint
(`torch_dist://<store host>:<store port>/<worker id>`). A worker that hosts its own store
(the default for plain processes) so depends on no other process to receive KV, and a
dead worker's store takes only that worker's own (already lost) pairs with it. A
deployment may still share one store: every worker then publishes the same address.
"""

from __future__ import annotations

import time

import torch

from splitserve.common.kv_layout import KVLayout
from splitserve.kvtransfer._pairs import CONNECT, Outgoing, RecvPair, SendPair
from splitserve.kvtransfer._rendezvous import create_rendezvous_store, default_bind_host
from splitserve.kvtransfer._tables import ABORT, DATA, RecvEntry, SendEntry
from splitserve.kvtransfer._wire import REASON_ABORTED
from splitserve.kvtransfer.base import KVBackend

__all__ = ["TorchDistBackend", "create_rendezvous_store", "endpoint", "parse_endpoint"]

_SCHEME = "torch_dist://"


def endpoint(store_host: str, store_port: int, worker_id: str) -> str:
    """The KV endpoint a worker publishes: where pairs *into* it rendezvous, and its id."""
    return f"{_SCHEME}{store_host}:{int(store_port)}/{worker_id}"


def parse_endpoint(value: str) -> tuple[tuple[str, int], str]:
    """((store host, store port), worker id) of an endpoint; ValueError if malformed."""
    rest = value.removeprefix(_SCHEME)
    address, slash, worker_id = rest.partition("/")
    host, colon, port = address.rpartition(":")
    if rest == value or not slash or not worker_id or not colon or not host or not port.isdigit():
        raise ValueError(f"not a torch_dist KV endpoint: {value!r}")
    return (host, int(port)), worker_id


class TorchDistBackend(KVBackend):
    """A worker's KV endpoint over torch.distributed.

    store_host/store_port: the rendezvous TCPStore (see create_rendezvous_store) where pairs
    into this worker meet: hosted by this process, or one the deployment shares. Pairs out
    of it meet at the store of the receiver's endpoint (start_send's peer_endpoint; without
    one, this worker's own store). device: where the KV caches live; "cpu" uses gloo,
    "cuda[:N]" NCCL. bind_host: the address gloo listens on (default: 127.0.0.1 when the
    store is on loopback, else gloo's choice). op_timeout_s bounds one payload receive.
    auth_token: the deployment's cluster token; with it, pairs connect only to peers that
    prove they hold it too (see kvtransfer._rendezvous).
    """

    def __init__(
        self,
        worker_id: str,
        layout: KVLayout,
        store_host: str,
        store_port: int,
        device: str | torch.device = "cpu",
        *,
        bind_host: str | None = None,
        default_timeout_s: float = 30.0,
        op_timeout_s: float = 30.0,
        stash_limit_bytes: int = 256 << 20,
        namespace: str = "splitserve/kv",
        auth_token: str | None = None,
    ) -> None:
        super().__init__(
            worker_id,
            layout,
            default_timeout_s=default_timeout_s,
            stash_limit_bytes=stash_limit_bytes,
        )
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.store_addr = (store_host, int(store_port))
        self.bind_host = default_bind_host(store_host) if bind_host is None else bind_host
        self.op_timeout_s = op_timeout_s
        self.namespace = namespace
        self.auth_token = auth_token
        self._senders: dict[str, SendPair] = {}
        self._receivers: dict[str, RecvPair] = {}

    def close(self) -> None:
        super().close()
        with self._lock:
            pairs = [*self._senders.values(), *self._receivers.values()]
            self._senders.clear()
            self._receivers.clear()
        for pair in pairs:
            pair.stop()
        end = time.monotonic() + 1.0
        for pair in pairs:
            # a thread inside a network wait leaves at that wait's deadline (daemon thread)
            pair.thread.join(timeout=max(0.0, end - time.monotonic()))

    @property
    def endpoint(self) -> str:
        """What this worker publishes so that senders find its store."""
        return endpoint(*self.store_addr, self.worker_id)

    def _sender(self, dst: str, store_addr: tuple[str, int] | None = None) -> SendPair:
        """The pair thread to `dst`; a new one when `dst` now rendezvous elsewhere (it
        restarted with the same id and a new store): the old pair's queue fails."""
        stale: SendPair | None = None
        with self._lock:
            self._check_open()
            pair = self._senders.get(dst)
            if pair is not None and store_addr is not None and pair.link.store_addr != store_addr:
                stale, pair = pair, None
            if pair is None:
                pair = self._senders[dst] = SendPair(self, dst, store_addr or self.store_addr)
        if stale is not None:
            stale.stop(f"worker {dst!r} moved its KV endpoint")
        return pair

    def _open_send(self, entry: SendEntry) -> None:
        handle = entry.handle
        if handle.peer == self.worker_id:
            handle._fail("a worker cannot send KV to itself over torch.distributed")
            return
        store_addr = None
        if entry.peer_endpoint:
            try:
                store_addr, worker_id = parse_endpoint(entry.peer_endpoint)
            except ValueError as exc:
                handle._fail(str(exc))
                return
            if worker_id != handle.peer:
                handle._fail(f"endpoint {entry.peer_endpoint!r} is not worker {handle.peer!r}'s")
                return
        self._sender(handle.peer, store_addr).put(Outgoing(entry, CONNECT))

    def _submit(
        self, entry: SendEntry, layer: int, buffer: torch.Tensor, ready: torch.cuda.Event | None
    ) -> None:
        with self._lock:
            pair = self._senders.get(entry.handle.peer)
        if pair is None:  # closed, or replaced after this transfer began
            entry.handle._fail(f"no connection to worker {entry.handle.peer!r} any more")
            return
        pair.put(Outgoing(entry, DATA, layer, buffer, ready))

    def _open_recv(self, entry: RecvEntry) -> None:
        src = entry.handle.peer
        if src == self.worker_id:
            entry.fail("a worker cannot receive KV from itself over torch.distributed")
            return
        with self._lock:
            self._check_open()
            pair = self._receivers.get(src)
            if pair is None:
                pair = self._receivers[src] = RecvPair(self, src, self.store_addr)
        pair.wake()

    def _notify_abort(self, entry: SendEntry, reason: str) -> None:
        with self._lock:
            pair = self._senders.get(entry.handle.peer)
        if pair is not None:
            pair.put(Outgoing(entry, ABORT, reason=REASON_ABORTED))

    def _check_caches(self, k: torch.Tensor, v: torch.Tensor) -> None:
        super()._check_caches(k, v)
        if k.device.type != self.device.type:
            raise ValueError(f"caches on {k.device}, but this backend moves {self.device} tensors")
