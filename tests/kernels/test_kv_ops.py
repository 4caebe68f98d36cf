"""store_kv / pack_kv / unpack_kv: Triton and reference, checked bit for bit."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import kv_ops
from splitserve.kernels import reference as ref

IMPLS = {"reference": ref, "triton": kv_ops}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _caches(gen, num_blocks, block_size, num_kv_heads, head_dim, dtype):
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k = torch.randn(shape, generator=gen).to(dtype=dtype, device=_device())
    v = torch.randn(shape, generator=gen).to(dtype=dtype, device=_device())
    return k, v


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("block_size", "num_kv_heads", "head_dim"), [(16, 2, 64), (8, 3, 80), (1, 1, 16)])
def test_pack_then_unpack_elsewhere_reproduces_blocks(gen, impl, dtype, block_size, num_kv_heads, head_dim):
    ops = IMPLS[impl]
    k_src, v_src = _caches(gen, 9, block_size, num_kv_heads, head_dim, dtype)
    src_ids = torch.tensor([7, 2, 5, 0], device=_device())
    buf = torch.empty(2, 4, block_size, num_kv_heads, head_dim, dtype=dtype, device=_device())
    assert ops.pack_kv(k_src, v_src, src_ids, buf) is buf
    assert torch.equal(buf[0], k_src[src_ids]) and torch.equal(buf[1], v_src[src_ids])

    k_dst, v_dst = _caches(gen, 6, block_size, num_kv_heads, head_dim, dtype)
    k_before, v_before = k_dst.clone(), v_dst.clone()
    dst_ids = torch.tensor([1, 4, 0, 3], device=_device(), dtype=torch.int32)
    ops.unpack_kv(buf, k_dst, v_dst, dst_ids)
    assert torch.equal(k_dst[dst_ids.long()], k_src[src_ids])
    assert torch.equal(v_dst[dst_ids.long()], v_src[src_ids])
    untouched = torch.tensor([2, 5], device=_device())
    assert torch.equal(k_dst[untouched], k_before[untouched])
    assert torch.equal(v_dst[untouched], v_before[untouched])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_skips_negative_slots_bit_exact(gen, impl, dtype):
    ops = IMPLS[impl]
    block_size, num_kv_heads, head_dim = 8, 2, 80
    k_cache, v_cache = _caches(gen, 5, block_size, num_kv_heads, head_dim, dtype)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    k = torch.randn(6, num_kv_heads, head_dim, generator=gen).to(dtype=dtype, device=_device())
    v = torch.randn(6, num_kv_heads, head_dim, generator=gen).to(dtype=dtype, device=_device())
    slots = torch.tensor([0, -1, 13, 39, -5, 20], device=_device())
    ops.store_kv(k, v, k_cache, v_cache, slots)

    expected_k, expected_v = before_k.view(-1, num_kv_heads, head_dim).clone(), before_v.view(-1, num_kv_heads, head_dim).clone()
    for i, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expected_k[slot], expected_v[slot] = k[i], v[i]
    assert torch.equal(k_cache.view(-1, num_kv_heads, head_dim), expected_k)
    assert torch.equal(v_cache.view(-1, num_kv_heads, head_dim), expected_v)


@pytest.mark.parametrize(("dtype", "cache_dtype"), [(torch.float32, torch.bfloat16),
                                                    (torch.float32, torch.float16),
                                                    (torch.bfloat16, torch.float16)])
def test_triton_store_rounds_into_a_half_width_cache_like_the_reference(gen, dtype, cache_dtype):
    block_size, num_kv_heads, head_dim = 8, 2, 80
    k_cache, v_cache = _caches(gen, 5, block_size, num_kv_heads, head_dim, cache_dtype)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    # Values between two bf16 neighbours, where truncating and rounding differ.
    k = (torch.randn(6, num_kv_heads, head_dim, generator=gen) * 3).to(dtype=dtype, device=_device())
    v = (torch.randn(6, num_kv_heads, head_dim, generator=gen) * 3).to(dtype=dtype, device=_device())
    slots = torch.tensor([0, -1, 13, 39, -5, 20], device=_device())
    ref.store_kv(k, v, expected_k, expected_v, slots)
    kv_ops.store_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache.view(torch.int16), expected_k.view(torch.int16))
    assert torch.equal(v_cache.view(torch.int16), expected_v.view(torch.int16))


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_triton_store_matches_reference_into_a_strided_pool(gen, slot_dtype):
    """Caches that are views of a [num_blocks, 2, block_size, kv_heads, d] pool (not
    contiguous per layer) are addressed through their strides."""
    pool = torch.randn(6, 2, 4, 2, 16, generator=gen).to(_device())
    pool_ref = pool.clone()
    k = torch.randn(10, 2, 16, generator=gen).to(_device())
    v = torch.randn(10, 2, 16, generator=gen).to(_device())
    slots = torch.tensor([23, 0, 5, -1, 6, 7, 12, 1, -1, 18], device=_device(), dtype=slot_dtype)
    kv_ops.store_kv(k, v, pool[:, 0], pool[:, 1], slots)
    ref.store_kv(k, v, pool_ref[:, 0], pool_ref[:, 1], slots)
    assert torch.equal(pool, pool_ref)
    assert torch.equal(pool[5, 0, 3], k[0]) and torch.equal(pool[5, 1, 3], v[0])  # slot 23
    expected_k, expected_v = pool_ref[:, 0], pool_ref[:, 1]

    buf = torch.empty(2, 3, 4, 2, 16, device=_device())
    ids = torch.tensor([5, 0, 3], device=_device())
    kv_ops.pack_kv(pool[:, 0], pool[:, 1], ids, buf)
    assert torch.equal(buf[0], expected_k[ids]) and torch.equal(buf[1], expected_v[ids])


def test_store_kv_rejects_mismatched_shapes(gen):
    k_cache, v_cache = _caches(gen, 2, 4, 2, 16, torch.float32)
    k = torch.randn(3, 1, 16, device=_device())
    for ops in IMPLS.values():
        with pytest.raises(AssertionError):
            ops.store_kv(k, k, k_cache, v_cache, torch.zeros(3, dtype=torch.long, device=_device()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_realistic_pack_unpack_store_bf16():
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (4096, 16, 8, 128)
    k_cache = torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16)
    ids = torch.randperm(4096, generator=gen, device="cuda")[:256]
    buf = torch.empty(2, 256, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
    kv_ops.pack_kv(k_cache, v_cache, ids, buf)
    assert torch.equal(buf[0], k_cache[ids]) and torch.equal(buf[1], v_cache[ids])
    k2, v2 = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    dst = torch.randperm(4096, generator=gen, device="cuda")[:256]
    kv_ops.unpack_kv(buf, k2, v2, dst)
    assert torch.equal(k2[dst], k_cache[ids]) and torch.equal(v2[dst], v_cache[ids])
    slots = torch.randperm(4096 * 16, generator=gen, device="cuda")[:2048]
    slots[::7] = -1
    new = torch.randn(2048, 8, 128, generator=gen, device="cuda", dtype=torch.bfloat16)
    a, b = k_cache.clone(), v_cache.clone()
    kv_ops.store_kv(new, new, k_cache, v_cache, slots)
    ref.store_kv(new, new, a, b, slots)
    assert torch.equal(k_cache, a) and torch.equal(v_cache, b)
