"""The C++ CPU paged decode kernel against the torch reference (and metamorphic checks)."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import cpu_ext, reference

pytestmark = pytest.mark.skipif(cpu_ext.load() is None, reason="CPU kernel could not be built")

TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}


def _case(num_seqs: int, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
          lens: list[int], dtype: torch.dtype, seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-n // block_size) for n in lens) + 1
    num_blocks = num_seqs * max_blocks + 3
    k = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    tables = torch.randperm(num_blocks, generator=g)[: num_seqs * max_blocks]
    tables = tables.view(num_seqs, max_blocks).to(torch.int32)
    q = torch.randn(num_seqs, num_heads, head_dim, generator=g).to(dtype)
    return q, k, v, tables, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (9, 3), (8, 2), (16, 2)])
@pytest.mark.parametrize("block_size", [1, 8, 16])
def test_matches_reference(dtype: torch.dtype, num_heads: int, num_kv_heads: int,
                           block_size: int) -> None:
    lens = [1, block_size - 1 or 1, block_size, block_size + 1, 37, 130]
    q, k, v, tables, ctx = _case(len(lens), num_heads, num_kv_heads, 64, block_size, lens, dtype)
    expected = reference.paged_decode_attention(q, k, v, tables, ctx, 0.125)
    got = cpu_ext.paged_decode_attention(q, k, v, tables, ctx, 0.125)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), expected.float(), rtol=rtol, atol=atol)


# (query dtype, cache dtype): a half-width cache under an fp32 model, and each half type's
# cache under the other half type.
MIXED = [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
         (torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)]


@pytest.mark.parametrize(("q_dtype", "cache_dtype"), MIXED)
@pytest.mark.parametrize("head_dim", [64, 80])  # the register loops; the generic loops
def test_a_half_width_cache_under_a_wider_query(q_dtype: torch.dtype, cache_dtype: torch.dtype,
                                                head_dim: int) -> None:
    lens = [1, 15, 16, 17, 37, 130]
    q, k, v, tables, ctx = _case(len(lens), 9, 3, head_dim, 16, lens, cache_dtype)
    q = q.to(q_dtype)
    got = cpu_ext.paged_decode_attention(q, k, v, tables, ctx, 0.125)
    assert got.dtype == q_dtype
    # The cache's values read exactly, then fp32 math: like the reference on the same
    # values widened to q's dtype (the bf16 <-> fp16 cases: the reference rounds K/V to q's
    # half type, the kernel does not; their tolerance is q's).
    expected = reference.paged_decode_attention(q, k, v, tables, ctx, 0.125)
    torch.testing.assert_close(got.float(), expected.float(), rtol=TOLERANCE[q_dtype][0],
                               atol=TOLERANCE[q_dtype][1])
    if q_dtype == torch.float32:
        widened = reference.paged_decode_attention(q, k.float(), v.float(), tables, ctx, 0.125)
        torch.testing.assert_close(got, widened, rtol=1e-5, atol=1e-5)


def test_a_cache_of_another_width_is_refused() -> None:
    q, k, v, tables, ctx = _case(2, 4, 4, 64, 16, [3, 9], torch.float32)
    with pytest.raises(RuntimeError, match="cache dtype must match q"):
        cpu_ext.paged_decode_attention(q.to(torch.bfloat16), k, v, tables, ctx, 0.125)


@pytest.mark.parametrize("head_dim", [80, 128])
def test_other_head_dims_and_strided_out(head_dim: int) -> None:
    q, k, v, tables, ctx = _case(3, 6, 2, head_dim, 16, [5, 33, 64], torch.float32, seed=2)
    expected = reference.paged_decode_attention(q, k, v, tables, ctx, head_dim**-0.5)
    wide = torch.zeros(3, 8, head_dim)
    out = wide[:, 1:7]  # a strided view, as the engine's decode rows can be
    cpu_ext.paged_decode_attention(q, k, v, tables, ctx, head_dim**-0.5, out=out)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(wide[:, 0], torch.zeros(3, head_dim))


def test_shuffled_block_ids_give_the_same_output() -> None:
    q, k, v, tables, ctx = _case(2, 8, 2, 64, 8, [20, 41], torch.float32, seed=3)
    first = cpu_ext.paged_decode_attention(q, k, v, tables, ctx, 0.125)
    perm = torch.randperm(k.shape[0], generator=torch.Generator().manual_seed(9))
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel())
    moved_tables = inverse[tables.long()].to(torch.int32)  # block b now lives at inverse[b]
    second = cpu_ext.paged_decode_attention(q, k[perm], v[perm], moved_tables, ctx, 0.125)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(32, 1, 64), (4, 2, 288)])
def test_wide_groups_and_heads_over_several_softmax_runs(num_heads: int, num_kv_heads: int,
                                                         head_dim: int) -> None:
    # 32 query heads on one kv head (MQA) and head_dim above 256; 200 slots = 4 online-
    # softmax runs of 64, so the running max/sum rescaling is exercised across runs.
    lens = [1, 64, 65, 200]
    q, k, v, tables, ctx = _case(4, num_heads, num_kv_heads, head_dim, 16, lens, torch.float32,
                                 seed=5)
    k[:, :, :, 0] += torch.linspace(-30, 30, k.shape[0]).view(-1, 1, 1)  # uneven maxima
    expected = reference.paged_decode_attention(q, k, v, tables, ctx, head_dim**-0.5)
    got = cpu_ext.paged_decode_attention(q, k, v, tables, ctx, head_dim**-0.5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_empty_context_gives_zeros_like_the_reference() -> None:
    q, k, v, tables, _ = _case(2, 4, 2, 64, 16, [3, 5], torch.float32, seed=6)
    ctx = torch.tensor([0, 5], dtype=torch.int32)
    expected = reference.paged_decode_attention(q, k, v, tables, ctx, 0.125)
    got = cpu_ext.paged_decode_attention(q, k, v, tables, ctx, 0.125)
    assert torch.equal(got[0], torch.zeros_like(got[0]))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_many_sequences_of_mixed_lengths_per_thread(dtype: torch.dtype, head_dim: int) -> None:
    # The register-blocked path (head_dim 64 and 128) asks for the next run's rows, and after
    # a task's last run for the next task's first; empty and one-slot contexts sit between
    # long ones, so those requests cross sequences, kv heads and empty tasks.
    lens = [0, 1, 200, 64, 129, 3, 0, 77, 300]
    q, k, v, tables, ctx = _case(len(lens), 12, 3, head_dim, 16, lens, dtype, seed=11)
    expected = reference.paged_decode_attention(q, k, v, tables, ctx, head_dim**-0.5)
    got = cpu_ext.paged_decode_attention(q, k, v, tables, ctx, head_dim**-0.5)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), expected.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize(("q_dtype", "cache_dtype"),
                         [(torch.float32, torch.float16), (torch.float32, torch.bfloat16),
                          (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)])
@pytest.mark.parametrize("group", [2, 3, 4])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_a_query_head_group_gives_the_bits_of_its_heads_one_at_a_time(
        q_dtype: torch.dtype, cache_dtype: torch.dtype, group: int, head_dim: int) -> None:
    # A bf16 / fp16 cache row is converted once for the whole group of query heads that
    # share its kv head (the grouped loops); each head alone (a group of 1) takes the
    # per-head loops. Each head's products are summed in the same order either way.
    lens = [1, 16, 63, 64, 65, 200]
    num_kv_heads = 2
    q, k, v, tables, ctx = _case(len(lens), group * num_kv_heads, num_kv_heads, head_dim, 16,
                                 lens, cache_dtype, seed=group)
    q = q.to(q_dtype)
    together = cpu_ext.paged_decode_attention(q, k, v, tables, ctx, head_dim ** -0.5)
    for head in range(group * num_kv_heads):
        kv = head // group
        alone = cpu_ext.paged_decode_attention(
            q[:, head:head + 1].contiguous(), k[:, :, kv:kv + 1].contiguous(),
            v[:, :, kv:kv + 1].contiguous(), tables, ctx, head_dim ** -0.5)
        assert torch.equal(together[:, head], alone[:, 0]), f"head {head}"
