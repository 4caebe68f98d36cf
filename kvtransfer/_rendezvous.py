"""Rendezvous for one ordered (sender, receiver) pair: epochs, layout handshake, the group.

Every pair gets its own 2-rank process group (sender = rank 0, receiver = rank 1), built
directly on a PrefixStore of the shared TCPStore, so one process holds many pairs and the
global default process group is never touched.

A connection that broke (peer died, a wait timed out: gloo closes the pair then) is never
reused: both sides move to a new epoch, a fresh key namespace in the store. Store keys of
the pair `<ns>/<src>-><dst>`:

    epoch/send, epoch/recv   counters: the epoch each side is at
    e<N>/layout/<role>       that side's KVLayout JSON
    e<N>/nonce/<role>        a random challenge of that side
    e<N>/proof/<role>        HMAC-SHA256 under the cluster token of (pair, epoch, role, its
                             nonce, the other's nonce, its layout); "" without a token
    e<N>/verdict/<role>      "ok", or why that side refused the other
    e<N>/pg/...              the process group's own rendezvous keys

The store and the KV channel carry no TLS (they must stay on a private network), so the
proofs are what keeps a process that is not a member of the deployment from joining a pair:
a side with the cluster token refuses a peer whose proof does not verify (no token, another
token, a replay from another epoch or pair), says so in its verdict, and both sides fail
the pair's transfers at once (KVPeerRefused) instead of building a group.

A side takes a new epoch (add 1) the first time it connects in this process and after every
connection it established (or refused for a layout mismatch); otherwise it retries the epoch
it holds. A side behind the other catches up. Both then meet at the same number.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from splitserve.common.kv_layout import KVLayout, KVLayoutMismatch, check_compatible

_POLL_S = 0.01
_CONNECT_ATTEMPT_S = 1.0  # one try at reaching a rendezvous store
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ConnectTimeout(TimeoutError):
    """The peer did not show up before the deadline."""


class KVPeerRefused(KVLayoutMismatch):
    """One side of a pair refused the other's proof of membership. Handled like a layout
    mismatch: the pair's transfers fail at once, without a retry."""


def _proof(token: str | None, pair: str, role: str, mine: str, theirs: str,
           layout_json: str) -> str:
    if not token:
        return ""
    message = "|".join((pair, role, mine, theirs, layout_json)).encode()
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def create_rendezvous_store(host: str = "127.0.0.1", port: int = 0, timeout_s: float = 30.0) -> Any:
    """Host the TCPStore that all workers' backends rendezvous through; `.port` is the port
    actually bound (pass port=0 to pick a free one). Keep the returned object alive.

    The listening socket is bound here, to `host` only, and handed to the store: TCPStore
    binds every interface when it opens the port itself, and on one machine nothing may
    listen beyond loopback.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(128)
    bound_port = listener.getsockname()[1]
    fd = listener.detach()  # the store's server takes the descriptor over
    return dist.TCPStore(
        host, bound_port, is_master=True, wait_for_workers=False,
        timeout=timedelta(seconds=timeout_s), master_listen_fd=fd,
    )


def _seconds_left(deadline: float) -> timedelta:
    return timedelta(seconds=max(0.05, deadline - time.monotonic()))


class PairLink:
    """This side's connection to one peer over one ordered pair (not thread-safe: it
    belongs to the one thread that serves the pair)."""

    def __init__(
        self,
        store_addr: tuple[str, int],
        pair_name: str,
        role: str,  # "send" (rank 0) or "recv" (rank 1)
        layout: KVLayout,
        names: tuple[str, str],  # (local worker id, remote worker id), for messages
        device: torch.device,
        bind_host: str | None,
        token: str | None = None,  # the cluster token: proves membership to the peer
    ) -> None:
        assert role in ("send", "recv"), role
        self.store_addr = store_addr
        self.name = pair_name
        self.role = role
        self.other = "recv" if role == "send" else "send"
        self.rank = 0 if role == "send" else 1
        self.layout = layout
        self.names = names
        self.device = device
        self.bind_host = bind_host
        self.token = token
        self.group: Any = None
        self.epoch = 0
        self._store: Any = None
        self._fresh = True  # next connect takes a new epoch

    @property
    def connected(self) -> bool:
        return self.group is not None

    def connect(self, deadline: float, wanted: Callable[[], bool]) -> None:
        """Meet the peer, check layouts, build the group. Raises ConnectTimeout,
        KVLayoutMismatch (the peer refuses too), or the store's/backend's error."""
        assert self.group is None
        try:
            while True:
                try:
                    self._connect(deadline, wanted)
                    return
                except _EpochAbandoned:
                    continue  # meet the peer in the epoch it moved on to
        except BaseException:
            self._store = None  # a client whose wait timed out may be out of step: drop it
            raise

    def _connect(self, deadline: float, wanted: Callable[[], bool]) -> None:
        store = self._client(deadline, wanted)
        self.epoch = self._agree_epoch(store, deadline, wanted)
        self._fresh = True  # this epoch's namespace is now used, whatever happens next
        prefix = f"{self.name}/e{self.epoch}/"
        nonce = secrets.token_hex(16)
        layout_json = self.layout.to_json()
        store.set(f"{prefix}nonce/{self.role}", nonce)
        store.set(f"{prefix}layout/{self.role}", layout_json)
        remote_json = self._read(store, f"{prefix}layout/{self.other}", deadline, wanted)
        remote_nonce = self._read(store, f"{prefix}nonce/{self.other}", deadline, wanted)
        store.set(f"{prefix}proof/{self.role}", _proof(
            self.token, prefix, self.role, nonce, remote_nonce, layout_json))
        remote_proof = self._read(store, f"{prefix}proof/{self.other}", deadline, wanted)
        expected = _proof(self.token, prefix, self.other, remote_nonce, nonce, remote_json)
        local_name, remote_name = self.names
        refusal = ""
        if self.token and not hmac.compare_digest(expected, remote_proof):
            refusal = (f"worker {local_name!r} refused the KV peer claiming to be "
                       f"{remote_name!r}: " + ("it presented no cluster token" if not remote_proof
                                               else "its cluster-token proof does not verify"))
        store.set(f"{prefix}verdict/{self.role}", refusal or "ok")
        if refusal:
            raise KVPeerRefused(refusal)
        verdict = self._read(store, f"{prefix}verdict/{self.other}", deadline, wanted)
        if verdict != "ok":
            raise KVPeerRefused(verdict)
        remote = KVLayout.from_json(remote_json)
        check_compatible(self.layout, remote, f"worker {local_name!r}", f"worker {remote_name!r}")
        store.set_timeout(_seconds_left(deadline))
        self.group = _make_group(
            dist.PrefixStore(f"{prefix}pg/", store),
            self.rank,
            deadline,
            self.device,
            self.bind_host,
        )

    def teardown(self) -> None:
        # The store client goes too: a store restarted at the same address (a kv-store
        # process, a worker's --serve-kv-store) does not take back an old client's
        # connection, and the next connect would fail at once on it.
        self._store = None
        group, self.group = self.group, None
        if group is not None and self.device.type == "cuda":
            try:
                group.abort()  # NCCL: release a communicator that may be stuck
            except Exception:  # noqa: BLE001 - best effort on a broken connection
                pass

    def _client(self, deadline: float, wanted: Callable[[], bool]) -> Any:
        """A client of the pair's store. A TCPStore client keeps retrying a refused
        connection until its timeout, so connect in short attempts and stop as soon as the
        deadline passes or no transfer needs the pair (a dead peer's store)."""
        while self._store is None:
            host, port = self.store_addr
            attempt = min(_CONNECT_ATTEMPT_S, max(0.05, deadline - time.monotonic()))
            try:
                self._store = dist.TCPStore(
                    host,
                    port,
                    is_master=False,
                    wait_for_workers=False,
                    timeout=timedelta(seconds=attempt),
                )
            except Exception as exc:  # noqa: BLE001 - torch raises several types here
                self._check_waiting(deadline, wanted, f"(its store {host}:{port}: {exc})")
                time.sleep(_POLL_S * 5)  # an error that comes at once must not spin
        self._store.set_timeout(_seconds_left(deadline))
        return self._store

    def _agree_epoch(self, store: Any, deadline: float, wanted: Callable[[], bool]) -> int:
        mine_key, other_key = f"{self.name}/epoch/{self.role}", f"{self.name}/epoch/{self.other}"
        mine = int(store.add(mine_key, 1 if self._fresh else 0))
        self._fresh = False
        while True:
            other = int(store.add(other_key, 0))
            if other > mine:
                mine = int(store.add(mine_key, other - mine))
            elif other == mine:
                return mine
            self._check_waiting(deadline, wanted, "to connect")
            time.sleep(_POLL_S)

    def _read(self, store: Any, key: str, deadline: float, wanted: Callable[[], bool]) -> str:
        """The value of `key`, once the peer has set it. _EpochAbandoned if the peer moved
        on to a later epoch meanwhile: the keys found in this one are from a handshake it
        gave up (its values would be read, and its next ones awaited, for ever)."""
        other_epoch = f"{self.name}/epoch/{self.other}"
        while not store.check([key]):
            if int(store.add(other_epoch, 0)) > self.epoch:
                raise _EpochAbandoned
            self._check_waiting(deadline, wanted, "for its handshake")
            time.sleep(_POLL_S)
        return bytes(store.get(key)).decode("utf-8", "replace")

    def _check_waiting(self, deadline: float, wanted: Callable[[], bool], what: str) -> None:
        if time.monotonic() > deadline:
            raise ConnectTimeout(
                f"timed out waiting for peer worker {self.names[1]!r} {what} "
                f"(pair {self.name}, epoch {self.epoch or '?'}): is it alive?"
            )
        if not wanted():
            raise ConnectTimeout(f"no transfer needs pair {self.name} any more")


class _EpochAbandoned(Exception):
    """The peer left the epoch this side is meeting it in (an attempt it gave up)."""


def _make_group(
    store: Any, rank: int, deadline: float, device: torch.device, bind_host: str | None
) -> Any:
    timeout = _seconds_left(deadline)
    if device.type == "cuda":
        nccl = getattr(dist, "ProcessGroupNCCL", None)
        if nccl is None:
            raise RuntimeError("this torch build has no NCCL: use a CPU device (gloo)")
        opts = nccl.Options()
        # NCCL's watchdog tears the process down when an op outlives the group timeout, so
        # keep it far above our own explicit wait timeouts (a timed-out wait aborts the group).
        opts._timeout = max(timeout, timedelta(hours=1))
        return nccl(store, rank, 2, opts)
    gloo: Any = dist.ProcessGroupGloo  # _Options is private and missing from the stubs
    opts = gloo._Options()
    opts._timeout = timeout
    interface = os.environ.get("GLOO_SOCKET_IFNAME", "").split(",")[0]
    if interface:  # the operator named the interface (e.g. one NIC of several): it wins
        opts._devices = [gloo.create_device(interface=interface)]
    elif bind_host is not None:
        opts._devices = [gloo.create_device(hostname=bind_host)]
    else:
        opts._devices = [gloo.create_default_device()]
    return gloo(store, rank, 2, opts)


def default_bind_host(store_host: str) -> str | None:
    """Loopback stores imply a single machine: bind gloo to loopback too; otherwise let gloo
    pick (GLOO_SOCKET_IFNAME names the interface; workers pass their own address)."""
    return "127.0.0.1" if store_host in _LOOPBACK else None
