"""The torch.distributed backend (gloo, in this process) when connections break, stores
restart and peers give up mid-handshake: both ends of a transfer agree on how it ended, a
transfer with time left is not failed for another's deadline, and no side waits out its
deadline for a handshake its peer abandoned."""

from __future__ import annotations

import gc
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from splitserve.common.kv_layout import KVLayout
from splitserve.kvtransfer import _pairs
from splitserve.kvtransfer._rendezvous import PairLink
from splitserve.kvtransfer.state import TransferState
from splitserve.kvtransfer.torch_dist import TorchDistBackend, create_rendezvous_store

sys.path.insert(0, str(Path(__file__).parent))
from kv_peer import make_pool  # noqa: E402

pytestmark = pytest.mark.timeout(90)

LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=8, block_size=4, dtype="float32")


def _until(condition, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_connection_broken_mid_transfer_fails_it_on_both_sides(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Transfer A sent its first layer; the connection then breaks under the first message
    of transfer B (which had sent nothing: it is retried on a new connection). The
    receiver fails A (its later layers can only come over another connection), so the
    sender must fail A too, not send the rest over the new connection and call it DONE."""
    store = create_rendezvous_store("127.0.0.1", 0)
    send_data = _pairs.SendPair._send_data
    broke: list[str] = []

    def break_under_b(self: _pairs.SendPair, msg: Any) -> None:
        if msg.entry.handle.request_id == "B" and not broke:
            broke.append("B")
            self.link.teardown()  # the connection closes: the receiver's read fails
            raise ConnectionError("injected: connection reset under B's first message")
        send_data(self, msg)

    monkeypatch.setattr(_pairs.SendPair, "_send_data", break_under_b)
    p = TorchDistBackend("P", LAYOUT, "127.0.0.1", store.port)
    d = TorchDistBackend("D", LAYOUT, "127.0.0.1", store.port)
    try:
        sk, sv = make_pool(LAYOUT, 1)
        dk, dv = make_pool(LAYOUT, 2)
        recv_a = d.expect("A", "P", [1, 2], dk, dv, timeout_s=20)
        recv_b = d.expect("B", "P", [3], dk, dv, timeout_s=20)
        send_a = p.start_send("A", "D", [4, 5], [1, 2])
        p.send_layer(send_a, 0, sk[0], sv[0])
        _until(lambda: recv_a.layers_done >= 1)
        send_b = p.start_send("B", "D", [6], [3])
        p.send_layer(send_b, 0, sk[0], sv[0])
        _until(lambda: recv_a.poll() is TransferState.FAILED)  # the receiver saw the break
        for layer in range(1, LAYOUT.num_layers):
            p.send_layer(send_a, layer, sk[layer], sv[layer])
            p.send_layer(send_b, layer, sk[layer], sv[layer])
        for handle in (send_a, send_b, recv_b):
            handle.wait(20)
        assert broke == ["B"]
        assert send_a.poll() is TransferState.FAILED, send_a.error
        assert "mid-transfer" in (send_a.error or "")
        # B moved nothing over the broken connection: it went over the next one, whole.
        assert send_b.poll() is TransferState.DONE and recv_b.poll() is TransferState.DONE
        for layer in range(LAYOUT.num_layers):
            assert torch.equal(dk[layer][3], sk[layer][6])
            assert torch.equal(dv[layer][3], sv[layer][6])
    finally:
        p.close()
        d.close()


def test_a_failed_connect_spares_the_expects_with_time_left() -> None:
    """The receiver's connect attempt runs until the latest deadline among the transfers
    expected when it began; when it gives up, a transfer expected meanwhile with a later
    deadline stays expected, and arrives once the sender comes."""
    store = create_rendezvous_store("127.0.0.1", 0)
    d = TorchDistBackend("D", LAYOUT, "127.0.0.1", store.port)
    p = None
    try:
        dk, dv = make_pool(LAYOUT, 2)
        short = d.expect("short", "P", [1], dk, dv, timeout_s=1.0)
        time.sleep(0.3)  # the connect attempt for `short` is under way
        long = d.expect("long", "P", [2], dk, dv, timeout_s=30)
        short.wait(10)
        assert short.poll() is TransferState.FAILED
        time.sleep(0.3)
        assert long.poll() is TransferState.WAITING, long.error
        p = TorchDistBackend("P", LAYOUT, "127.0.0.1", store.port)
        sk, sv = make_pool(LAYOUT, 1)
        send = p.start_send("long", "D", [7], [2])
        p.send_all_layers(send, sk, sv)
        assert send.wait(20).finished and long.wait(20).finished
        assert long.poll() is TransferState.DONE, long.error
        assert torch.equal(dk[0][2], sk[0][7])
    finally:
        d.close()
        if p is not None:
            p.close()


def test_a_store_restarted_at_the_same_address_is_met_again() -> None:
    """The receiver's store (a worker's own, or a kv-store process) restarts at the same
    host:port: the sender's next transfer meets the new store, not a dead client."""
    store = create_rendezvous_store("127.0.0.1", 0)
    port = store.port
    p = TorchDistBackend("P", LAYOUT, "127.0.0.1", create_rendezvous_store("127.0.0.1", 0).port)
    sk, sv = make_pool(LAYOUT, 1)

    def transfer(d: TorchDistBackend, request_id: str) -> tuple[TransferState, TransferState]:
        dk, dv = make_pool(LAYOUT, 2)
        recv = d.expect(request_id, "P", [1], dk, dv, timeout_s=15)
        send = p.start_send(request_id, "D", [2], [1], peer_endpoint=d.endpoint)
        p.send_all_layers(send, sk, sv)
        send.wait(15)
        recv.wait(15)
        return send.poll(), recv.poll()

    try:
        d = TorchDistBackend("D", LAYOUT, "127.0.0.1", port)
        assert transfer(d, "before") == (TransferState.DONE, TransferState.DONE)
        d.close()
        del d, store
        gc.collect()  # the store's server goes with its last reference
        time.sleep(0.3)
        restarted = create_rendezvous_store("127.0.0.1", port)  # back at the same address
        assert restarted.port == port
        d = TorchDistBackend("D", LAYOUT, "127.0.0.1", port)
        assert transfer(d, "after") == (TransferState.DONE, TransferState.DONE)
        d.close()
    finally:
        p.close()


def test_a_handshake_its_peer_gave_up_is_not_waited_for() -> None:
    """The receiver timed out before the sender came; the sender then met the receiver's
    epoch, wrote its half of the handshake and gave up too. When both try again, the
    receiver must not take that abandoned half for the sender's answer (and wait out its
    deadline for the rest): both meet in the sender's new epoch at once."""
    store = create_rendezvous_store("127.0.0.1", 0)

    def link(role: str) -> PairLink:
        return PairLink(("127.0.0.1", store.port), "test/P->D", role, LAYOUT, ("a", "b"),
                        torch.device("cpu"), "127.0.0.1")

    sender, receiver = link("send"), link("recv")
    for side in (receiver, sender):  # each alone: both time out
        with pytest.raises(Exception, match="timed out"):
            side.connect(time.monotonic() + 0.5, lambda: True)
    took: dict[str, float] = {}

    def connect(side: PairLink) -> None:
        started = time.monotonic()
        side.connect(time.monotonic() + 20, lambda: True)
        took[side.role] = time.monotonic() - started

    threads = [threading.Thread(target=connect, args=(side,)) for side in (receiver, sender)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    try:
        assert set(took) == {"send", "recv"}, took
        assert max(took.values()) < 10.0, took  # (before: each waited out its 20 s)
        assert sender.epoch == receiver.epoch
    finally:
        sender.teardown()
        receiver.teardown()
