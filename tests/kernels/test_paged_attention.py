"""Triton paged decode attention: vs the reference, metamorphic, and split-K differential.

On CPU the kernels run in the Triton interpreter (see conftest.py), so shapes are small.
"""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import paged_attention as pa
from splitserve.kernels import reference as ref

TOL = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}


def run_both(q, kv, scale=None, **kwargs):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, scale)
    out = torch.full_like(q, float("nan"))
    got = pa.paged_decode_attention(*args, out=out, **kwargs)
    assert got is out
    return got, ref.paged_decode_attention(*args)


# Context lengths around the block size hurt the most: 1, bs-1, bs, bs+1, odd, several blocks.
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_context_lengths_around_block_size(make_batch, block_size):
    bs = block_size
    lens = [1, bs - 1, bs, bs + 1, 2 * bs + 3, 5 * bs - 1]
    q, kv = make_batch(lens, 8, 2, 64, bs)
    got, expected = run_both(q, kv)
    torch.testing.assert_close(got, expected, **TOL[torch.float32])


@pytest.mark.parametrize("group", [1, 3, 4, 8])
def test_gqa_ratios(make_batch, group):
    num_kv_heads = 2
    q, kv = make_batch([1, 13, 40], group * num_kv_heads, num_kv_heads, 64, 16)
    got, expected = run_both(q, kv)
    torch.testing.assert_close(got, expected, **TOL[torch.float32])


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128])
def test_head_dims(make_batch, head_dim):
    q, kv = make_batch([3, 29], 4, 1, head_dim, 16)
    got, expected = run_both(q, kv)
    torch.testing.assert_close(got, expected, **TOL[torch.float32])


@pytest.mark.parametrize("block_size", [1, 64])
def test_extreme_block_sizes(make_batch, block_size):
    q, kv = make_batch([1, 2, 70], 4, 2, 64, block_size)
    got, expected = run_both(q, kv, num_splits=2)
    torch.testing.assert_close(got, expected, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(make_batch, dtype):
    q, kv = make_batch([1, 17, 100], 8, 2, 64, 16, dtype=dtype)
    for splits in (1, 3):
        got, expected = run_both(q, kv, num_splits=splits)
        assert got.dtype == dtype
        torch.testing.assert_close(got, expected, **TOL[dtype])


@pytest.mark.parametrize(("q_dtype", "cache_dtype"), [(torch.float32, torch.bfloat16),
                                                      (torch.float32, torch.float16),
                                                      (torch.bfloat16, torch.float16)])
def test_a_half_width_cache_under_a_wider_query(make_batch, q_dtype, cache_dtype):
    q, kv = make_batch([1, 17, 100], 8, 2, 64, 16, dtype=cache_dtype)
    q = q.to(q_dtype)
    for splits in (1, 3):
        got, expected = run_both(q, kv, num_splits=splits)
        assert got.dtype == q_dtype
        torch.testing.assert_close(got, expected, **TOL[q_dtype])


def test_batch_mixing_very_different_lengths(make_batch):
    # Short sequences beside a long one: with several splits the short ones leave splits empty.
    q, kv = make_batch([1, 300, 2, 65, 9], 4, 1, 64, 16)
    for splits in (1, 4, 16):
        got, expected = run_both(q, kv, num_splits=splits)
        torch.testing.assert_close(got, expected, **TOL[torch.float32])


def test_strided_query_and_output(make_batch):
    # q and out as views of wider [num_seqs, 2 * num_heads, head_dim] buffers.
    q_wide, kv = make_batch([5, 33], 8, 2, 64, 16)
    q = q_wide[:, :4]
    q_wide2, _ = make_batch([1, 1], 8, 2, 64, 16)
    out = q_wide2[:, 4:]
    before = q_wide2[:, :4].clone()
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 0.125)
    pa.paged_decode_attention(*args, out=out, num_splits=2)
    torch.testing.assert_close(out, ref.paged_decode_attention(*args), **TOL[torch.float32])
    assert torch.equal(q_wide2[:, :4], before)


@pytest.mark.parametrize("new_block_size", [8, 32])
def test_metamorphic_reblocking_and_shuffled_ids(make_batch, rebuild, new_block_size):
    """The same KV under another block size, or other (shuffled) block ids, gives the same
    output. The kernel's tiles do not depend on block size, so this holds bit for bit."""
    q, kv = make_batch([1, 15, 16, 17, 50], 8, 2, 64, 16)
    base, _ = run_both(q, kv)
    for block_size in (16, new_block_size):
        other = rebuild(kv.dense_k, kv.dense_v, block_size)
        assert not torch.equal(other.block_tables[:, :1], kv.block_tables[:, :1]) or block_size != 16
        got, expected = run_both(q, other)
        assert torch.equal(got, base)
        torch.testing.assert_close(expected, base, **TOL[torch.float32])


@pytest.mark.parametrize("splits", [2, 3, 5, 16])
def test_differential_split_k_equals_single_split(make_batch, splits):
    q, kv = make_batch([1, 64, 65, 200, 131], 6, 2, 80, 16)
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 0.1)
    single = pa.paged_decode_attention(*args, num_splits=1)
    scratch = pa.alloc_scratch(len(kv.context_lens), 6, 80, q.device)
    scratch.partial_lse.fill_(float("nan"))
    multi = pa.paged_decode_attention(*args, num_splits=splits, scratch=scratch)
    torch.testing.assert_close(multi, single, atol=1e-6, rtol=1e-6)
    assert torch.isfinite(scratch.partial_lse[3, :, 1]).all()  # seq 3 really was split


def test_scratch_reused_across_calls_gives_fresh_results(make_batch):
    """A stale scratch (from a call with more sequences/longer contexts) must not leak."""
    q1, kv1 = make_batch([200, 190, 180, 170], 4, 2, 64, 16)
    scratch = pa.alloc_scratch(4, 4, 64, q1.device)
    pa.paged_decode_attention(q1, kv1.k_cache, kv1.v_cache, kv1.block_tables, kv1.context_lens,
                              0.125, scratch=scratch, num_splits=8)
    q2, kv2 = make_batch([3, 70], 4, 2, 64, 16)
    got, expected = run_both(q2, kv2, scratch=scratch, num_splits=8)
    torch.testing.assert_close(got, expected, **TOL[torch.float32])


def test_choose_num_splits_is_a_pure_bounded_heuristic():
    # Plenty of (seq, kv head) programs: no split.
    assert pa.choose_num_splits(64, 8, 4096, 132) == 1
    # Few programs and long contexts: about two programs per SM (one 32k sequence over 8
    # kv heads on 132 SMs: 33 splits, 264 programs), bounded by MAX_SPLITS.
    assert pa.choose_num_splits(1, 8, 32768, 132) == 33
    assert pa.choose_num_splits(1, 1, 1 << 20, 132) == pa.MAX_SPLITS
    assert pa.choose_num_splits(4, 8, 4096, 132) == 9
    # Short contexts are never split below the minimum partition.
    assert pa.choose_num_splits(1, 1, 300, 132) == 2
    assert pa.choose_num_splits(1, 1, 1, 132) == 1
    for args in [(1, 1, 1, 1), (3, 2, 5000, 100), (256, 32, 100, 7)]:
        n = pa.choose_num_splits(*args)
        assert 1 <= n <= pa.MAX_SPLITS and n == pa.choose_num_splits(*args)


def test_launcher_rejects_bad_arguments(make_batch):
    q, kv = make_batch([5], 6, 4, 64, 16)  # 6 heads do not divide into 4 kv heads
    with pytest.raises(AssertionError):
        pa.paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 1.0)
    q, kv = make_batch([5], 4, 2, 64, 16)
    with pytest.raises(AssertionError):
        pa.paged_decode_attention(q.half(), kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 1.0)
    with pytest.raises(AssertionError):
        pa.paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 1.0,
                                  num_splits=pa.MAX_SPLITS + 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("splits", [None, 1, 4])
def test_gpu_realistic_shape_bf16(splits):
    gen = torch.Generator(device="cuda").manual_seed(0)
    num_seqs, ctx, num_heads, num_kv_heads, head_dim, block_size = 64, 4096, 32, 8, 128, 16
    blocks_per_seq = ctx // block_size
    num_blocks = num_seqs * blocks_per_seq + 7
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16)
    perm = torch.randperm(num_blocks, generator=gen, device="cuda")[: num_seqs * blocks_per_seq]
    table = perm.view(num_seqs, blocks_per_seq).int()
    lens = torch.randint(1, ctx + 1, (num_seqs,), generator=gen, device="cuda", dtype=torch.int32)
    lens[0], lens[1] = ctx, 1
    q = torch.randn(num_seqs, num_heads, head_dim, generator=gen, device="cuda", dtype=torch.bfloat16)
    args = (q, k_cache, v_cache, table, lens, head_dim**-0.5)
    got = pa.paged_decode_attention(*args, num_splits=splits, max_context_len=ctx)
    expected = ref.paged_decode_attention(*args)
    torch.testing.assert_close(got, expected, **TOL[torch.bfloat16])
