"""The int8 KV cache (kernels.kv_quant): the format's error bound, every store (torch, the
fused C++ rope + store, Triton) writing the same bytes, and every decode kernel (torch,
C++, Triton) reading them as the torch reference does on the dequantized cache."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import cpu_ext, kv_ops, paged_attention, reference
from splitserve.kernels.kv_quant import (
    dequantize_rows,
    hadamard,
    hadamard_matrix,
    quantize_rows,
    rotates,
    row_width,
)
from tests.kernels.conftest import KERNEL_DEVICE
from tests.kernels.test_cpu_fused_ops import _rope_case, torch_rope_store

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("head_dim", [64, 48])
def test_quantize_error_is_at_most_half_a_step_and_zero_rows_stay_zero(head_dim: int) -> None:
    """Per element in the stored basis (rotated for a power-of-two head_dim, where the
    rotation keeps the error's length)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, head_dim, generator=g) * torch.rand(64, 4, 1, generator=g) * 10
    x[3, 1] = 0.0
    packed = quantize_rows(x)
    assert packed.dtype == torch.int8 and packed.shape == (64, 4, row_width(head_dim))
    back = dequantize_rows(packed, torch.float32)
    stored = hadamard(x) if rotates(torch.int8, head_dim) else x
    step = stored.abs().amax(-1, keepdim=True) / 127
    error = hadamard(back) - stored if rotates(torch.int8, head_dim) else back - x
    assert bool((error.abs() <= step * 0.5 + step * 2e-3 + 1e-5).all())
    assert bool((back[3, 1] == 0).all())
    assert int(packed[..., :head_dim].abs().max()) == 127  # the full range is used


def test_hadamard_is_orthonormal_and_its_own_inverse() -> None:
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(4))
    h = hadamard_matrix(64)
    torch.testing.assert_close(h @ h, torch.eye(64), atol=1e-6, rtol=0)
    torch.testing.assert_close(hadamard(hadamard(x)), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(hadamard(x), x @ h, atol=1e-5, rtol=0)


def test_rotation_shrinks_the_error_of_rows_with_outlier_channels() -> None:
    """Keys carry a few large channels; rotated, they no longer set a coarse scale for the
    rest (the reason the format rotates)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(256, 64, generator=g)
    x[:, [3, 17]] *= 40.0
    rotated = (dequantize_rows(quantize_rows(x), torch.float32) - x).norm(dim=-1)
    step = x.abs().amax(-1, keepdim=True) / 127  # plain per-row absmax, no rotation
    plain = ((torch.round(x / step).clamp(-127, 127) * step) - x).norm(dim=-1)
    assert float(rotated.mean()) < 0.5 * float(plain.mean())


def _quantized_cache(g: torch.Generator, num_blocks: int, block_size: int, heads: int,
                     head_dim: int, codec: str = "int8") -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.randn(num_blocks, block_size, heads, head_dim, generator=g) * 2
    v = torch.randn(num_blocks, block_size, heads, head_dim, generator=g)
    return quantize_rows(k, codec), quantize_rows(v, codec)


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kernels_write_the_reference_bytes(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    k = (torch.randn(7, 3, 64, generator=g) * 3).to(dtype)
    v = torch.randn(7, 3, 64, generator=g).to(dtype)
    slots = torch.tensor([5, 0, -1, 17, 9, 30, 2])
    expected = [torch.zeros(4, 8, 3, 66, dtype=torch.int8) for _ in range(2)]
    reference.store_kv(k, v, *expected, slots)
    got = [torch.zeros(4, 8, 3, 66, dtype=torch.int8, device=KERNEL_DEVICE) for _ in range(2)]
    kv_ops.store_kv(k.to(KERNEL_DEVICE), v.to(KERNEL_DEVICE), *got, slots.to(KERNEL_DEVICE))
    assert torch.equal(got[0].cpu(), expected[0]) and torch.equal(got[1].cpu(), expected[1])


@pytest.mark.skipif(cpu_ext.load() is None, reason="CPU kernels could not be built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", [(9, 3, 64), (8, 2, 128)])
def test_fused_rope_store_quantizes_like_the_reference(dtype: torch.dtype,
                                                       layout: tuple[int, int, int]) -> None:
    qkv, cos, sin, k_float, _, slots = _rope_case(24, layout, 16, dtype)
    shape = (*k_float.shape[:3], row_width(layout[2]))
    k_expected = torch.zeros(shape, dtype=torch.int8)
    v_expected = torch.zeros(shape, dtype=torch.int8)
    qkv_expected = torch_rope_store(qkv.clone(), cos, sin, k_expected, v_expected, slots,
                                    *layout)
    k_cache, v_cache = torch.zeros_like(k_expected), torch.zeros_like(v_expected)
    cpu_ext.rotary_store_kv_(qkv, cos, sin, k_cache, v_cache, slots, *layout)
    assert torch.equal(qkv, qkv_expected)
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)


def decode_case(dtype: torch.dtype, group: int, head_dim: int = 64,  # type: ignore[no-untyped-def]
                codec: str = "int8"):
    """A quantized paged cache, queries, block tables and lengths, and the reference
    output over the cache's dequantized values (shared with test_kv_fp8)."""
    g = torch.Generator().manual_seed(2)
    heads = 2
    k_cache, v_cache = _quantized_cache(g, 24, 16, heads, head_dim, codec)
    q = torch.randn(4, heads * group, head_dim, generator=g).to(dtype)
    tables = torch.randperm(24, generator=g)[:20].view(4, 5).to(torch.int32)
    lens = torch.tensor([1, 16, 41, 80], dtype=torch.int32)
    expected = reference.paged_decode_attention(
        q, dequantize_rows(k_cache, dtype), dequantize_rows(v_cache, dtype), tables, lens,
        0.125)
    return q, k_cache, v_cache, tables, lens, expected


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 3])
def test_torch_decode_reads_int8_as_its_dequantized_values(dtype: torch.dtype,
                                                           group: int) -> None:
    q, k, v, tables, lens, expected = decode_case(dtype, group)
    got = reference.paged_decode_attention(q, k, v, tables, lens, 0.125)
    assert torch.equal(got, expected)


@pytest.mark.skipif(cpu_ext.load() is None, reason="CPU kernels could not be built")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 3])
def test_cpu_decode_dequantizes_in_place(dtype: torch.dtype, group: int) -> None:
    q, k, v, tables, lens, expected = decode_case(dtype, group)
    out = torch.empty_like(q)
    cpu_ext.paged_decode_attention(q, k, v, tables, lens, 0.125, out=out)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [1, 3])
def test_triton_decode_dequantizes_in_place(dtype: torch.dtype, splits: int) -> None:
    q, k, v, tables, lens, expected = decode_case(dtype, 3)
    dev = KERNEL_DEVICE
    out = paged_attention.paged_decode_attention(
        q.to(dev), k.to(dev), v.to(dev), tables.to(dev), lens.to(dev), 0.125, num_splits=splits)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float().cpu(), expected.float(), rtol=tol, atol=tol)


def test_pack_and_unpack_move_rows_with_their_scales() -> None:
    g = torch.Generator().manual_seed(3)
    k, v = _quantized_cache(g, 6, 8, 2, 64)
    ids = torch.tensor([4, 1])
    buffer = torch.empty(2, 2, 8, 2, 66, dtype=torch.int8)
    for ops in (reference, kv_ops):
        dst_k, dst_v = torch.zeros_like(k), torch.zeros_like(v)
        ops.pack_kv(k, v, ids, buffer)
        ops.unpack_kv(buffer, dst_k, dst_v, torch.tensor([0, 5]))
        assert torch.equal(dst_k[0], k[4]) and torch.equal(dst_v[5], v[1])
