"""InProcBackend: bit-exact transfers, early data, refusals, deadlines, aborts."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from splitserve.common.kv_layout import KVLayout
from splitserve.kvtransfer._pack import _fallback_pack, _fallback_unpack, pack_layer, unpack_layer
from splitserve.kvtransfer.inproc import InProcBackend, InProcRegistry
from splitserve.kvtransfer.state import TransferState

sys.path.insert(0, str(Path(__file__).parent))
from kv_peer import POOL_BLOCKS, check_received, make_pool, send_interleaved  # noqa: E402

LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=8, block_size=4, dtype="float32")
REQUESTS = [
    {"id": "req-a", "src": [3, 0, 17], "dst": [9, 4, 1]},
    {"id": "req-b", "src": [5], "dst": [23]},
    {"id": "req-c", "src": [8, 22, 11, 2, 14], "dst": [0, 12, 7, 20, 3]},
]


@pytest.fixture
def registry() -> Iterator[InProcRegistry]:
    yield InProcRegistry()


def _pair(
    registry: InProcRegistry, layout: KVLayout = LAYOUT
) -> tuple[InProcBackend, InProcBackend]:
    return InProcBackend("P", layout, registry), InProcBackend("D", layout, registry)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_interleaved_requests_bit_exact(registry: InProcRegistry, dtype: str) -> None:
    layout = KVLayout(4, 2, 8, 4, dtype)
    p, d = _pair(registry, layout)
    ks, vs = make_pool(layout, 8)
    recv = [d.expect(r["id"], "P", r["dst"], ks, vs, timeout_s=5) for r in REQUESTS]
    sent = send_interleaved(p, "D", layout, REQUESTS, 7, 5.0, layers=2)
    assert [h.poll() for h in recv] == [TransferState.TRANSFERRING] * 3
    assert [h.layers_done for h in recv] == [2, 2, 2]
    src_k, src_v = make_pool(layout, 7)
    for layer in range(2, layout.num_layers):
        for h in sent:
            p.send_layer(h, layer, src_k[layer], src_v[layer])
    assert [h.poll() for h in sent + recv] == [TransferState.DONE] * 6
    assert check_received(layout, REQUESTS, 7, ks, vs) == (True, True)
    nbytes = layout.bytes_for(9)
    assert (p.stats().bytes_sent, d.stats().bytes_received, d.stats().transfers_ok) == (
        nbytes,
        nbytes,
        3,
    )
    assert recv[2].bytes == layout.bytes_for(5)


def test_data_before_expect_is_kept_until_expect(registry: InProcRegistry) -> None:
    p, d = _pair(registry)
    [sent] = send_interleaved(p, "D", LAYOUT, REQUESTS[:1], 7, 5.0)
    assert sent.poll() is TransferState.DONE
    ks, vs = make_pool(LAYOUT, 8)
    handle = d.expect("req-a", "P", REQUESTS[0]["dst"], ks, vs)
    assert handle.poll() is TransferState.DONE
    assert check_received(LAYOUT, REQUESTS[:1], 7, ks, vs) == (True, True)


def test_all_layers_at_once_before_and_after_expect(registry: InProcRegistry) -> None:
    p, d = _pair(registry)
    src_k, src_v = make_pool(LAYOUT, 7)
    ks, vs = make_pool(LAYOUT, 8)
    early, late = REQUESTS[0], REQUESTS[2]
    sent = p.start_send(early["id"], "D", early["src"], early["dst"])
    p.send_all_layers(sent, src_k, src_v)  # stashed until expect()
    handles = [d.expect(early["id"], "P", early["dst"], ks, vs),
               d.expect(late["id"], "P", late["dst"], ks, vs)]
    assert handles[0].poll() is TransferState.DONE
    sent2 = p.start_send(late["id"], "D", late["src"], late["dst"])
    p.send_all_layers(sent2, src_k, src_v)
    assert [h.poll() for h in (sent, sent2, *handles)] == [TransferState.DONE] * 4
    assert check_received(LAYOUT, [early, late], 7, ks, vs) == (True, True)
    assert p.stats().bytes_sent == d.stats().bytes_received == LAYOUT.bytes_for(8)


def test_layout_mismatch_refused_on_both_sides(registry: InProcRegistry) -> None:
    p = InProcBackend("P", LAYOUT, registry)
    d = InProcBackend("D", KVLayout(4, 2, 8, 8, "float32"), registry)
    ks, vs = make_pool(KVLayout(4, 2, 8, 8, "float32"), 8)
    recv = d.expect("req-a", "P", [1, 2, 3], ks, vs)
    sent = p.start_send("req-a", "D", [3, 0, 17], [1, 2, 3])
    assert sent.poll() is TransferState.FAILED and recv.poll() is TransferState.FAILED
    for handle in (sent, recv):
        assert "KV layout mismatch" in (handle.error or "") and "block_size" in (handle.error or "")
        assert "'P'" in (handle.error or "") and "'D'" in (handle.error or "")


def test_deadline_fails_waiting_transfer(registry: InProcRegistry) -> None:
    _, d = _pair(registry)
    ks, vs = make_pool(LAYOUT, 8)
    handle = d.expect("req-a", "P", [1], ks, vs, timeout_s=0.1)
    assert handle.poll() is TransferState.WAITING
    time.sleep(0.15)
    assert handle.poll() is TransferState.FAILED
    assert "timed out" in (handle.error or "") and "'P'" in (handle.error or "")
    assert d.stats().transfers_failed == 1


def test_receiver_abort_stops_writes(registry: InProcRegistry) -> None:
    p, d = _pair(registry)
    ks, vs = make_pool(LAYOUT, 8)
    recv = d.expect("req-a", "P", REQUESTS[0]["dst"], ks, vs)
    [sent] = send_interleaved(p, "D", LAYOUT, REQUESTS[:1], 7, 5.0, layers=1)
    assert recv.layers_done == 1
    assert d.abort("req-a", "client gone") == 1
    assert recv.poll() is TransferState.FAILED and "client gone" in (recv.error or "")
    before = [k.clone() for k in ks]
    src_k, src_v = make_pool(LAYOUT, 7)
    for layer in range(1, LAYOUT.num_layers):
        p.send_layer(sent, layer, src_k[layer], src_v[layer])
    assert all(torch.equal(a, b) for a, b in zip(before, ks, strict=True))


def test_sender_abort_fails_receiver(registry: InProcRegistry) -> None:
    p, d = _pair(registry)
    ks, vs = make_pool(LAYOUT, 8)
    recv = d.expect("req-a", "P", REQUESTS[0]["dst"], ks, vs)
    send_interleaved(p, "D", LAYOUT, REQUESTS[:1], 7, 5.0, layers=1)
    assert p.abort("req-a", "prefill cancelled") == 1
    assert recv.poll() is TransferState.FAILED
    assert "gave up" in (recv.error or "") and "prefill cancelled" in (recv.error or "")


def test_dst_block_mismatch_is_refused(registry: InProcRegistry) -> None:
    p, d = _pair(registry)
    ks, vs = make_pool(LAYOUT, 8)
    before = [k.clone() for k in ks]
    recv = d.expect("req-a", "P", [9, 4, 2], ks, vs)  # the sender was told [9, 4, 1]
    send_interleaved(p, "D", LAYOUT, REQUESTS[:1], 7, 5.0)
    assert recv.poll() is TransferState.FAILED and "block mismatch" in (recv.error or "")
    assert all(torch.equal(a, b) for a, b in zip(before, ks, strict=True))


def test_unknown_peer_and_bad_calls(registry: InProcRegistry) -> None:
    p, _ = _pair(registry)
    ks, vs = make_pool(LAYOUT, 7)
    handle = p.start_send("r", "nobody", [1], [2])
    p.send_layer(handle, 0, ks[0], vs[0])
    assert handle.poll() is TransferState.FAILED and "no in-process worker 'nobody'" in (
        handle.error or ""
    )
    ok = p.start_send("r2", "D", [1], [2])
    p.send_layer(ok, 0, ks[0], vs[0])
    with pytest.raises(ValueError, match="already sent"):
        p.send_layer(ok, 0, ks[0], vs[0])
    with pytest.raises(ValueError, match="out of range"):
        p.send_layer(ok, 4, ks[0], vs[0])
    far = p.start_send("r4", "D", [POOL_BLOCKS], [2])
    with pytest.raises(ValueError, match="beyond a 24-block pool"):
        p.send_layer(far, 0, ks[0], vs[0])
    with pytest.raises(ValueError, match="already sending"):
        p.start_send("r2", "D", [1], [2])
    with pytest.raises(ValueError, match="id 'P' is already registered"):
        InProcBackend("P", LAYOUT, registry)
    p.close()
    with pytest.raises(RuntimeError, match="closed"):
        p.start_send("r3", "D", [1], [2])


def test_fallback_pack_matches_kernels_reference() -> None:
    ks, vs = make_pool(KVLayout(1, 3, 5, 3, "bfloat16"), 3)
    ids = torch.tensor([7, 0, 19, 4])
    ours = torch.empty(2, 4, 3, 3, 5, dtype=torch.bfloat16)
    _fallback_pack(ks[0], vs[0], ids, ours)
    ref = pack_layer(ks[0], vs[0], ids, torch.empty_like(ours))
    assert torch.equal(ours, ref) and torch.equal(ours[0, 2], ks[0][19])
    k1, v1, k2, v2 = (torch.zeros(POOL_BLOCKS, 3, 3, 5, dtype=torch.bfloat16) for _ in range(4))
    _fallback_unpack(ours, k1, v1, ids)
    unpack_layer(ours, k2, v2, ids)
    assert torch.equal(k1, k2) and torch.equal(v1, v2) and torch.equal(v1[ids], vs[0][ids])


@pytest.mark.gpu
def test_cuda_pools_bit_exact(registry: InProcRegistry) -> None:
    layout = KVLayout(4, 2, 8, 4, "bfloat16")
    p, d = _pair(registry, layout)
    ks, vs = make_pool(layout, 8, "cuda")
    recv = [d.expect(r["id"], "P", r["dst"], ks, vs) for r in REQUESTS]
    sent = send_interleaved(p, "D", layout, REQUESTS, 7, 5.0, device="cuda")
    assert [h.poll() for h in sent + recv] == [TransferState.DONE] * 6
    assert check_received(layout, REQUESTS, 7, ks, vs) == (True, True)
