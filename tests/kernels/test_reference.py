"""The plain-torch references against independent naive implementations and exact values."""

from __future__ import annotations

import math

import pytest
import torch

from splitserve.kernels import reference as ref


def naive_decode_attention(q, kv, scale):
    """Per-sequence, per-head loop in float64, reading the dense (unpaged) K/V."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = kv.dense_k[0].shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty(num_seqs, num_heads, head_dim, dtype=torch.float64)
    for s in range(num_seqs):
        k, v = kv.dense_k[s].double().cpu(), kv.dense_v[s].double().cpu()
        for h in range(num_heads):
            kvh = h // group
            scores = [float(q[s, h].double().cpu() @ k[t, kvh]) * scale for t in range(k.shape[0])]
            top = max(scores)
            weights = torch.tensor([math.exp(x - top) for x in scores], dtype=torch.float64)
            out[s, h] = (weights[:, None] * v[:, kvh]).sum(0) / weights.sum()
    return out


@pytest.mark.parametrize(
    ("lens", "num_heads", "num_kv_heads", "head_dim", "block_size"),
    [
        ([1], 4, 4, 16, 8),
        ([7, 8, 9, 1], 6, 2, 16, 8),
        ([33, 5], 8, 2, 24, 16),
        ([16, 17, 15], 8, 1, 32, 16),
        ([40, 3], 3, 1, 8, 1),
    ],
)
def test_reference_matches_naive_loop(make_batch, lens, num_heads, num_kv_heads, head_dim, block_size):
    q, kv = make_batch(lens, num_heads, num_kv_heads, head_dim, block_size, device=torch.device("cpu"))
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))
    got = ref.paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, scale, out=out)
    assert got is out
    expected = naive_decode_attention(q, kv, scale)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_reference_context_of_one_returns_that_value():
    # With one token of context, softmax weight is exactly 1: output == V row, any query.
    k_cache = torch.randn(4, 8, 2, 16)
    v_cache = torch.randn(4, 8, 2, 16)
    q = torch.randn(1, 4, 16)
    table = torch.tensor([[3, -1]], dtype=torch.int32)
    out = ref.paged_decode_attention(q, k_cache, v_cache, table, torch.tensor([1], dtype=torch.int32), 0.3)
    assert torch.equal(out[0, :2], v_cache[3, 0, 0].expand(2, 16))
    assert torch.equal(out[0, 2:], v_cache[3, 0, 1].expand(2, 16))


def test_reference_half_precision_output_dtype(make_batch):
    q, kv = make_batch([5, 20], 4, 2, 16, 8, dtype=torch.bfloat16, device=torch.device("cpu"))
    got = ref.paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 0.25)
    assert got.dtype == torch.bfloat16
    expected = naive_decode_attention(q, kv, 0.25)
    torch.testing.assert_close(got.double(), expected, atol=1e-2, rtol=1e-2)


def test_store_kv_writes_slots_and_skips_negative():
    k_cache = torch.zeros(3, 4, 1, 2)
    v_cache = torch.zeros(3, 4, 1, 2)
    k = torch.arange(1.0, 9.0).view(4, 1, 2)
    v = -k
    ref.store_kv(k, v, k_cache, v_cache, torch.tensor([5, -1, 0, 11]))
    expected = torch.zeros(3, 4, 1, 2)
    expected[1, 1], expected[0, 0], expected[2, 3] = k[0], k[2], k[3]
    assert torch.equal(k_cache, expected)
    assert torch.equal(v_cache, -expected)


def test_pack_unpack_reference_exact():
    k_cache = torch.arange(5 * 2 * 1 * 3, dtype=torch.float32).view(5, 2, 1, 3)
    v_cache = k_cache + 1000
    buf = torch.empty(2, 2, 2, 1, 3)
    assert ref.pack_kv(k_cache, v_cache, torch.tensor([4, 1]), buf) is buf
    assert torch.equal(buf[0], k_cache[[4, 1]])
    assert torch.equal(buf[1], v_cache[[4, 1]])
    k2, v2 = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    ref.unpack_kv(buf, k2, v2, torch.tensor([0, 2]))
    assert torch.equal(k2[0], k_cache[4]) and torch.equal(k2[2], k_cache[1])
    assert torch.equal(v2[0], v_cache[4]) and torch.equal(v2[2], v_cache[1])
    assert not k2[[1, 3, 4]].any() and not v2[[1, 3, 4]].any()
