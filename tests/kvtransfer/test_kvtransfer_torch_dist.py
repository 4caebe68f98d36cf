"""TorchDistBackend over real gloo between real processes on 127.0.0.1.

The pytest process hosts the rendezvous store and plays one side; kv_peer.py plays the other
in a subprocess that the dead-peer tests kill with SIGKILL.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from splitserve.common.kv_layout import KVLayout
from splitserve.kvtransfer.state import KVTransfer, TransferState
from splitserve.kvtransfer.torch_dist import (
    TorchDistBackend,
    create_rendezvous_store,
    endpoint,
    parse_endpoint,
)

sys.path.insert(0, str(Path(__file__).parent))
from kv_peer import check_received, make_pool, send_interleaved, wait_all  # noqa: E402

pytestmark = pytest.mark.timeout(90)  # a hang is a failure, not a stuck suite

PEER = Path(__file__).with_name("kv_peer.py")
ROOT = Path(__file__).resolve().parents[2]
LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=8, block_size=4, dtype="float32")
# three requests, different block counts, arbitrary (non-monotonic) src -> dst mappings
REQUESTS = [
    {"id": "req-a", "src": [3, 0, 17], "dst": [9, 4, 1]},
    {"id": "req-b", "src": [5], "dst": [23]},
    {"id": "req-c", "src": [8, 22, 11, 2, 14], "dst": [0, 12, 7, 20, 3]},
]


class Peer:
    """kv_peer.py in a subprocess; its stdout JSON lines arrive on a queue."""

    def __init__(self, spec: dict[str, Any]) -> None:
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self.proc = subprocess.Popen(
            [sys.executable, str(PEER), json.dumps(spec)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.lines.put(json.loads(line))

    def event(self, name: str, timeout_s: float = 30.0) -> dict[str, Any]:
        end = time.monotonic() + timeout_s
        while True:
            try:
                msg = self.lines.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"peer sent no {name!r} event (rc={self.proc.poll()})"
                ) from None
            if msg["event"] == name:
                return msg

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def finish(self) -> None:
        if self.proc.poll() is None:
            self.kill()


@pytest.fixture(scope="module")
def store() -> Iterator[Any]:
    s = create_rendezvous_store("127.0.0.1", 0)
    yield s


def _spec(
    store: Any, role: str, worker: str, peer: str, layout: KVLayout, **kw: Any
) -> dict[str, Any]:
    spec = {
        "role": role,
        "store": ["127.0.0.1", store.port],
        "worker": worker,
        "peer": peer,
        "layout": json.loads(layout.to_json()),
        "requests": REQUESTS,
        "seed": 7,
        "timeout_s": 20.0,
    }
    spec.update(kw)
    return spec


def _backend(store: Any, worker: str, layout: KVLayout = LAYOUT, **kw: Any) -> TorchDistBackend:
    return TorchDistBackend(worker, layout, "127.0.0.1", store.port, **kw)


def _wait_failed(handle: KVTransfer, limit_s: float) -> float:
    start = time.monotonic()
    while handle.poll() is not TransferState.FAILED:
        assert time.monotonic() - start < limit_s, f"{handle} not FAILED after {limit_s}s"
        time.sleep(0.005)
    return time.monotonic() - start


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_three_interleaved_requests_are_bit_exact(store: Any, dtype: str) -> None:
    layout = KVLayout(4, 2, 8, 4, dtype)
    sender = Peer(_spec(store, "send", f"P-{dtype}", f"D-{dtype}", layout))
    receiver = _backend(store, f"D-{dtype}", layout)
    try:
        ks, vs = make_pool(layout, 7 + 1)
        handles = [
            receiver.expect(r["id"], f"P-{dtype}", r["dst"], ks, vs, timeout_s=20) for r in REQUESTS
        ]
        wait_all(handles, 25)
        assert [h.state for h in handles] == [TransferState.DONE] * 3, [h.error for h in handles]
        assert check_received(layout, REQUESTS, 7, ks, vs) == (True, True)
        result = sender.event("result")
        assert result["states"] == ["done"] * 3, result["errors"]
        total_blocks = sum(len(r["src"]) for r in REQUESTS)
        expected_bytes = layout.bytes_for(total_blocks)
        assert result["stats"]["bytes_sent"] == expected_bytes
        stats = receiver.stats()
        assert (stats.bytes_received, stats.transfers_ok, stats.transfers_failed) == (
            expected_bytes,
            3,
            0,
        )
    finally:
        receiver.close()
        sender.finish()


def test_two_senders_into_one_pool(store: Any) -> None:
    """Two P processes send concurrently into one D pool; P2 reuses the request id 'req-a'
    (keys are per source worker), with its own dst blocks."""
    more = [
        {"id": "req-a", "src": [1, 2], "dst": [5, 6]},
        {"id": "req-e", "src": [19, 6, 13, 21], "dst": [22, 15, 18, 10]},
    ]
    senders = [
        Peer(_spec(store, "send", "P-1", "D-two", LAYOUT)),
        Peer(_spec(store, "send", "P-2", "D-two", LAYOUT, requests=more)),
    ]
    receiver = _backend(store, "D-two")
    try:
        ks, vs = make_pool(LAYOUT, 7 + 1)
        handles = [receiver.expect(r["id"], "P-1", r["dst"], ks, vs) for r in REQUESTS]
        handles += [receiver.expect(r["id"], "P-2", r["dst"], ks, vs) for r in more]
        wait_all(handles, 25)
        assert [h.state for h in handles] == [TransferState.DONE] * 5, [h.error for h in handles]
        assert check_received(LAYOUT, REQUESTS + more, 7, ks, vs) == (True, True)
        assert senders[0].event("result")["states"] == ["done"] * 3
        assert senders[1].event("result")["states"] == ["done"] * 2
    finally:
        receiver.close()
        for sender in senders:
            sender.finish()


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_pairs_meet_at_the_receivers_own_store() -> None:
    """No shared store: the receiver hosts its own and publishes it in its endpoint; the
    sender's own store is dead (nothing listens there) and is never needed."""
    own = create_rendezvous_store("127.0.0.1", 0)
    receiver = TorchDistBackend("D-own", LAYOUT, "127.0.0.1", own.port)
    assert parse_endpoint(receiver.endpoint) == (("127.0.0.1", own.port), "D-own")
    spec = _spec(own, "send", "P-own", "D-own", LAYOUT, peer_endpoint=receiver.endpoint)
    spec["store"] = ["127.0.0.1", _closed_port()]  # the sender's own store: dead
    sender = Peer(spec)
    try:
        ks, vs = make_pool(LAYOUT, 7 + 1)
        handles = [receiver.expect(r["id"], "P-own", r["dst"], ks, vs, 20) for r in REQUESTS]
        wait_all(handles, 25)
        assert [h.state for h in handles] == [TransferState.DONE] * 3, [h.error for h in handles]
        assert check_received(LAYOUT, REQUESTS, 7, ks, vs) == (True, True)
        assert sender.event("result")["states"] == ["done"] * 3
    finally:
        receiver.close()
        sender.finish()


def test_a_receiver_whose_store_is_gone_fails_the_send_at_its_deadline(store: Any) -> None:
    sender = _backend(store, "P-nostore")
    ks, vs = make_pool(LAYOUT, 7)
    gone = endpoint("127.0.0.1", _closed_port(), "D-nostore")
    try:
        start = time.monotonic()
        handle = sender.start_send("r", "D-nostore", [1], [2], timeout_s=1.5, peer_endpoint=gone)
        for layer in range(LAYOUT.num_layers):
            sender.send_layer(handle, layer, ks[layer], vs[layer])
        _wait_failed(handle, 5.0)
        assert time.monotonic() - start < 4.0
        assert "D-nostore" in (handle.error or ""), handle.error
        aborted = sender.start_send("r2", "D-nostore", [1], [2], timeout_s=60, peer_endpoint=gone)
        sender.abort("r2")
        assert aborted.poll() is TransferState.FAILED
        with pytest.raises(ValueError, match="not a torch_dist KV endpoint"):
            parse_endpoint("torch_dist://nohost/D")
        bad = sender.start_send("r3", "D-x", [1], [2], peer_endpoint="inproc://D-x")
        assert bad.poll() is TransferState.FAILED and "not a torch_dist" in (bad.error or "")
        other = sender.start_send("r4", "D-x", [1], [2], peer_endpoint=gone)
        assert other.poll() is TransferState.FAILED and "D-nostore" in (other.error or "")
    finally:
        sender.close()


def test_layout_mismatch_fails_on_both_sides(store: Any) -> None:
    other = KVLayout(4, 2, 16, 4, "float32")  # head_dim differs
    sender = Peer(_spec(store, "send", "P-mm", "D-mm", other, requests=REQUESTS[:1]))
    receiver = _backend(store, "D-mm")
    try:
        ks, vs = make_pool(LAYOUT, 8)
        handle = receiver.expect("req-a", "P-mm", REQUESTS[0]["dst"], ks, vs, timeout_s=20)
        _wait_failed(handle, 25)
        assert handle.error is not None
        for text in ("KV layout mismatch", "'D-mm'", "'P-mm'", "head_dim: 8 != 16"):
            assert text in handle.error, handle.error
        result = sender.event("result")
        assert result["states"] == ["failed"]
        assert (
            "KV layout mismatch" in result["errors"][0]
            and "head_dim: 16 != 8" in result["errors"][0]
        )
        assert receiver.stats().transfers_failed == 1
    finally:
        receiver.close()
        sender.finish()


def test_receiver_survives_dead_and_absent_senders(store: Any) -> None:
    receiver = _backend(store, "D-rx")
    ks, vs = make_pool(LAYOUT, 8)
    try:
        # a sender that never shows up: FAILED at the deadline
        ghost = receiver.expect("req-ghost", "P-ghost", [10], ks, vs, timeout_s=2.0)
        # a sender that sends one layer of req-a, then dies
        sender = Peer(
            _spec(store, "send", "P-rx", "D-rx", LAYOUT, requests=REQUESTS[:1], hold_after_layers=1)
        )
        handle = receiver.expect("req-a", "P-rx", REQUESTS[0]["dst"], ks, vs, timeout_s=20)
        sender.event("held")
        end = time.monotonic() + 5
        while handle.layers_done < 1 and time.monotonic() < end:
            time.sleep(0.002)
        assert handle.poll() is TransferState.TRANSFERRING and handle.layers_done == 1
        sender.kill()
        assert _wait_failed(handle, 3.0) < 3.0
        assert "P-rx" in (handle.error or "") and "connection" in (handle.error or "")
        assert _wait_failed(ghost, 3.0) < 3.0
        assert "timed out" in (ghost.error or "") and "P-ghost" in (ghost.error or "")
        # the same worker id comes back (a restart): the backend reconnects and works
        restarted = Peer(_spec(store, "send", "P-rx", "D-rx", LAYOUT, requests=REQUESTS[1:]))
        ks2, vs2 = make_pool(LAYOUT, 8)
        handles = [
            receiver.expect(r["id"], "P-rx", r["dst"], ks2, vs2, timeout_s=20) for r in REQUESTS[1:]
        ]
        wait_all(handles, 25)
        assert [h.state for h in handles] == [TransferState.DONE] * 2, [h.error for h in handles]
        assert check_received(LAYOUT, REQUESTS[1:], 7, ks2, vs2) == (True, True)
        assert restarted.event("result")["states"] == ["done", "done"]
    finally:
        receiver.close()


def test_sender_survives_dead_and_absent_receivers(store: Any) -> None:
    sender = _backend(store, "P-tx")
    ks, vs = make_pool(LAYOUT, 7)
    try:
        ghost = sender.start_send("req-ghost", "D-ghost", [1], [2], timeout_s=2.0)
        for layer in range(LAYOUT.num_layers):
            sender.send_layer(ghost, layer, ks[layer], vs[layer])
        receiver = Peer(
            _spec(store, "recv", "D-tx", "P-tx", LAYOUT, requests=REQUESTS[:1], hold_after_layers=1)
        )
        [handle] = send_interleaved(sender, "D-tx", LAYOUT, REQUESTS[:1], 7, 20.0, layers=1)
        receiver.event("held")
        receiver.kill()
        for layer in range(1, LAYOUT.num_layers):
            sender.send_layer(handle, layer, ks[layer], vs[layer])
        assert _wait_failed(handle, 3.0) < 3.0
        assert "D-tx" in (handle.error or ""), handle.error
        assert _wait_failed(ghost, 3.0) < 3.0
        assert "D-ghost" in (ghost.error or "") and "timed out" in (ghost.error or "")
        # another, healthy receiver is still served
        healthy = Peer(_spec(store, "recv", "D-ok", "P-tx", LAYOUT))
        handles = send_interleaved(sender, "D-ok", LAYOUT, REQUESTS, 7, 20.0)
        wait_all(handles, 25)
        assert [h.state for h in handles] == [TransferState.DONE] * 3, [h.error for h in handles]
        result = healthy.event("result")
        assert result["states"] == ["done"] * 3, result["errors"]
        assert (result["exact"], result["untouched"]) == (True, True)
        stats = sender.stats()
        assert stats.transfers_ok == 3 and stats.transfers_failed == 2
    finally:
        sender.close()


def test_live_pair_recovers_from_a_timeout_and_carries_aborts(store: Any) -> None:
    """Both ends in this process. A receive that times out closes the connection (gloo
    closes a pair on timeout); the next transfer reconnects without failing. A sender's
    abort reaches the receiver."""
    p, d = _backend(store, "P-live"), _backend(store, "D-live")
    src_k, src_v = make_pool(LAYOUT, 7)
    try:
        ks, vs = make_pool(LAYOUT, 8)
        warm = d.expect("req-b", "P-live", REQUESTS[1]["dst"], ks, vs)
        send_interleaved(p, "D-live", LAYOUT, REQUESTS[1:2], 7, 20.0)
        wait_all([warm], 20)
        assert warm.state is TransferState.DONE
        never = d.expect("req-x", "P-live", [2], ks, vs, timeout_s=1.0)
        assert _wait_failed(never, 3.0) >= 0.9
        assert "timed out" in (never.error or "")
        time.sleep(0.3)  # the receiver thread's wait ends at the same deadline: connection closed
        recv = d.expect("req-c", "P-live", REQUESTS[2]["dst"], ks, vs)
        [sent] = send_interleaved(p, "D-live", LAYOUT, REQUESTS[2:3], 7, 20.0)
        wait_all([recv, sent], 20)
        assert (recv.state, sent.state) == (TransferState.DONE, TransferState.DONE), recv.error
        assert check_received(LAYOUT, REQUESTS[1:3], 7, ks, vs) == (True, True)
        assert p.stats().transfers_failed == 0
        # abort after one layer: the receiver learns it from the sender, well before its deadline
        recv = d.expect("req-a", "P-live", REQUESTS[0]["dst"], ks, vs, timeout_s=20)
        [sent] = send_interleaved(p, "D-live", LAYOUT, REQUESTS[:1], 7, 20.0, layers=1)
        end = time.monotonic() + 5
        while recv.layers_done < 1 and time.monotonic() < end:
            time.sleep(0.002)
        assert p.abort("req-a", "client went away") == 1
        assert _wait_failed(recv, 3.0) < 3.0
        assert "gave up" in (recv.error or "") and "aborted by the sender" in (recv.error or "")
        assert sent.poll() is TransferState.FAILED and "client went away" in (sent.error or "")
        p.send_layer(sent, 1, src_k[1], src_v[1])  # a no-op on a failed transfer
    finally:
        p.close()
        d.close()


def test_self_send_and_bad_arguments_are_refused(store: Any) -> None:
    backend = _backend(store, "P-self")
    try:
        with pytest.raises(ValueError, match="src blocks but"):
            backend.start_send("r", "D", [1, 2], [3])
        with pytest.raises(ValueError, match="repeated"):
            backend.start_send("r", "D", [1, 1], [3, 4])
        handle = backend.start_send("r", "P-self", [1], [2])
        assert handle.poll() is TransferState.FAILED and "itself" in (handle.error or "")
        ks, vs = make_pool(LAYOUT, 1)
        handle = backend.expect("r", "P-self", [1], ks, vs)
        assert handle.poll() is TransferState.FAILED and "itself" in (handle.error or "")
        with pytest.raises(ValueError, match="caches must be"):
            backend.expect("r2", "P", [1], ks[:4], [v.to(torch.float64) for v in vs])
    finally:
        backend.close()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL point-to-point needs two GPUs")
def test_nccl_two_processes_bit_exact(store: Any) -> None:
    sender = Peer(_spec(store, "send", "P-nccl", "D-nccl", LAYOUT, device="cuda:1"))
    receiver = _backend(store, "D-nccl", device="cuda:0")
    try:
        ks, vs = make_pool(LAYOUT, 7 + 1, "cuda:0")
        handles = [receiver.expect(r["id"], "P-nccl", r["dst"], ks, vs) for r in REQUESTS]
        wait_all(handles, 60)
        assert [h.state for h in handles] == [TransferState.DONE] * 3, [h.error for h in handles]
        assert check_received(LAYOUT, REQUESTS, 7, ks, vs) == (True, True)
        assert sender.event("result")["states"] == ["done"] * 3
    finally:
        receiver.close()
        sender.finish()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_all_layers_in_one_message_are_bit_exact(dtype: str) -> None:
    """send_all_layers: one message carries every layer (a migration's KV, all computed)."""
    layout = KVLayout(4, 2, 8, 4, dtype)
    own = create_rendezvous_store("127.0.0.1", 0)
    receiver = TorchDistBackend(f"D-all-{dtype}", layout, "127.0.0.1", own.port)
    sender = TorchDistBackend(f"P-all-{dtype}", layout, "127.0.0.1", _closed_port())
    try:
        ks, vs = make_pool(layout, 7 + 1)
        src_k, src_v = make_pool(layout, 7)
        handles = [receiver.expect(r["id"], sender.worker_id, r["dst"], ks, vs, 20)
                   for r in REQUESTS]
        for r in REQUESTS:
            h = sender.start_send(r["id"], receiver.worker_id, r["src"], r["dst"], timeout_s=20,
                                  peer_endpoint=receiver.endpoint)
            sender.send_all_layers(h, src_k, src_v)
            with pytest.raises(ValueError, match="already"):
                sender.send_layer(h, 0, src_k[0], src_v[0])
        wait_all(handles, 25)
        assert [h.state for h in handles] == [TransferState.DONE] * 3, [h.error for h in handles]
        assert check_received(layout, REQUESTS, 7, ks, vs) == (True, True)
        total = sum(len(r["src"]) for r in REQUESTS)
        assert receiver.stats().bytes_received == layout.bytes_for(total)
        partial = sender.start_send("p", receiver.worker_id, [1], [2], timeout_s=5,
                                    peer_endpoint=receiver.endpoint)
        sender.send_layer(partial, 0, src_k[0], src_v[0])
        with pytest.raises(ValueError, match="one by one"):
            sender.send_all_layers(partial, src_k, src_v)
    finally:
        sender.close()
        receiver.close()


def _send_one(sender: TorchDistBackend, receiver: TorchDistBackend, request_id: str
              ) -> tuple[KVTransfer, KVTransfer, list[torch.Tensor], list[torch.Tensor]]:
    ks, vs = make_pool(LAYOUT, 7 + 1)
    src_k, src_v = make_pool(LAYOUT, 7)
    r = REQUESTS[0]
    recv = receiver.expect(request_id, sender.worker_id, r["dst"], ks, vs, 20)
    send = sender.start_send(request_id, receiver.worker_id, r["src"], r["dst"], timeout_s=20,
                             peer_endpoint=receiver.endpoint)
    sender.send_all_layers(send, src_k, src_v)
    return send, recv, ks, vs


@pytest.mark.parametrize("tokens", [("token-a" * 4, "token-b" * 4), (None, "token-b" * 4),
                                    ("token-a" * 4, None)])
def test_a_peer_without_the_cluster_token_is_refused_at_once(
        tokens: tuple[str | None, str | None]) -> None:
    """The KV channel has no TLS: a pair's handshake proves membership with an HMAC under
    the cluster token, and a side holding the token refuses a peer whose proof does not
    verify; both sides fail the transfer at once, no data moves (issue 13)."""
    send_token, recv_token = tokens
    own = create_rendezvous_store("127.0.0.1", 0)
    receiver = TorchDistBackend("D-auth", LAYOUT, "127.0.0.1", own.port, auth_token=recv_token)
    sender = TorchDistBackend("P-auth", LAYOUT, "127.0.0.1", _closed_port(),
                              auth_token=send_token)
    try:
        send, recv, _, _ = _send_one(sender, receiver, "req-auth")
        for handle in (send, recv):
            assert _wait_failed(handle, 15) < 10  # the handshake, not the 20 s deadline
            assert handle.error is not None and "refused the KV peer" in handle.error, \
                handle.error
        assert receiver.stats().bytes_received == 0
    finally:
        sender.close()
        receiver.close()


def test_peers_with_the_same_cluster_token_connect_bit_exact() -> None:
    own = create_rendezvous_store("127.0.0.1", 0)
    token = "shared-cluster-token-0123456789"
    receiver = TorchDistBackend("D-tok", LAYOUT, "127.0.0.1", own.port, auth_token=token)
    sender = TorchDistBackend("P-tok", LAYOUT, "127.0.0.1", _closed_port(), auth_token=token)
    try:
        send, recv, ks, vs = _send_one(sender, receiver, "req-a")
        wait_all([send, recv], 25)
        assert (send.state, recv.state) == (TransferState.DONE, TransferState.DONE), recv.error
        assert check_received(LAYOUT, REQUESTS[:1], 7, ks, vs) == (True, True)
    finally:
        sender.close()
        receiver.close()
