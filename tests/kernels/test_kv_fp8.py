"""The fp8 (e4m3) KV cache (kernels.kv_quant): the codec on hand-computed codes and edge
values (ties, subnormals, saturation, NaN and inf), every store (torch, the fused C++ rope +
store, Triton) writing the reference's bytes, every decode kernel (torch, C++, Triton)
reading each of the 254 finite codes exactly and whole caches as the reference does, and
pack/unpack moving rows with their scales."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import cpu_ext, kv_ops, paged_attention, reference
from splitserve.kernels.kv_quant import (
    dequantize_rows,
    e4m3_bits,
    e4m3_values,
    is_quantized,
    quantize_rows,
    rotates,
    row_width,
)
from tests.kernels.conftest import KERNEL_DEVICE
from tests.kernels.test_cpu_fused_ops import _rope_case, torch_rope_store
from tests.kernels.test_kv_quant import decode_case

DTYPES = [torch.float32, torch.bfloat16]
FINITE_CODES = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)


def _codes(values: list[float]) -> list[int]:
    """e4m3 codes of a row whose first value is 448 (so its scale is exactly 1); its width
    must not be a power of two (such rows are stored rotated)."""
    packed = quantize_rows(torch.tensor([448.0, *values]), "fp8")
    return packed[1: 1 + len(values)].tolist()


def test_codes_round_to_nearest_even_and_saturate() -> None:
    # 1 = 0x38; 1.0625 ties 1 | 1.125 -> 1 (even); 1.1875 ties 1.125 | 1.25 -> 1.25 (0x3A);
    # 15.5 -> 16 carries into the next exponent (0x58); 2^-9 is the least subnormal (0x01),
    # 2^-10 ties 0 | 2^-9 -> 0, 3 * 2^-10 ties 2^-9 | 2^-8 -> 2^-8 (0x02); 2^-6 is the least
    # normal (0x08); 448 is the largest finite code (0x7E); the sign is bit 7.
    values = [1.0, 1.0625, 1.1875, 15.5, 2**-9, 2**-10, 3 * 2**-10, 2**-6, 448.0, -1.0, -448.0]
    assert _codes(values) == [0x38, 0x38, 0x3A, 0x58, 0x01, 0x00, 0x02, 0x08, 0x7E, 0xB8, 0xFE]
    assert _codes([0.0, -0.0]) == [0x00, 0x80]


def test_every_finite_code_round_trips() -> None:
    values = e4m3_values(FINITE_CODES)
    assert bool(torch.isfinite(values).all()) and float(values.abs().max()) == 448.0
    assert torch.equal(e4m3_bits(values), FINITE_CODES)


def test_rows_keep_a_relative_precision_and_zero_rows_stay_zero() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, 48, generator=g) * torch.rand(64, 4, 1, generator=g) * 10
    x[3, 1] = 0.0
    x[5, 2, ::2] *= 1e-3  # small channels beside large ones
    packed = quantize_rows(x, "fp8")
    assert packed.dtype == torch.uint8 and packed.shape == (64, 4, row_width(48))
    assert is_quantized(packed) and rotates(torch.uint8, 64) and not rotates(torch.uint8, 48)
    back = dequantize_rows(packed, torch.float32)
    scale = packed[..., 48:].contiguous().view(torch.float16).float()
    # Half an e4m3 step: 2^-4 relative for normals, 2^-10 * scale below 2^-6 * scale.
    bound = torch.maximum(x.abs() * 2**-4, scale * 2**-10) * (1 + 2e-3) + 1e-7
    assert bool(((back - x).abs() <= bound).all())
    assert bool((back[3, 1] == 0).all()) and bool((packed[3, 1] == 0).all())
    assert int(packed[..., :48].bitwise_and(0x7F).max()) == 0x7E  # the full range is used


def test_nan_and_inf_inputs_are_stored_deterministically_and_finite() -> None:
    # Rows of 5 (not a power of two): stored unrotated, so each value keeps its place.
    x = torch.tensor([[448.0, float("nan"), -2.0, 0.5, 0.0],
                      [float("inf"), 1.0, -1.0, 0.0, 0.0],
                      [float("-inf"), float("inf"), float("nan"), 3.0, 0.0],
                      [1e30, -1e30, 1.0, 0.0, 0.0]])
    packed = quantize_rows(x, "fp8")
    back = dequantize_rows(packed, torch.float32)
    assert bool(torch.isfinite(back).all())
    assert back[0].tolist() == [448.0, 0.0, -2.0, 0.5, 0.0]  # NaN reads as 0 (scale 1)
    limit = 448.0 * 65504.0  # +-inf and overflow saturate at the largest a row holds
    assert back[1, 0].item() == limit and back[2, :2].tolist() == [-limit, limit]
    saturated = quantize_rows(torch.tensor([limit, -limit, 1.0, 0.0, 0.0]), "fp8")
    assert torch.equal(packed[3], saturated) and packed[1, 0].item() == 0x7E


def _edge_rows(num_rows: int, head_dim: int, seed: int) -> torch.Tensor:
    """[num_rows, head_dim] rows that exercise the encoder: each finite code's value,
    midpoints between neighbouring codes (ties), values a hair off them, subnormal and
    saturating magnitudes, NaN and inf, and random rows."""
    g = torch.Generator().manual_seed(seed)
    values = e4m3_values(FINITE_CODES).sort().values
    mids = (values[1:] + values[:-1]) / 2
    special = torch.tensor([0.0, -0.0, float("nan"), float("inf"), float("-inf"), 1e30,
                            2**-10, 3 * 2**-10, 2**-12])
    pool = torch.cat([values, mids, mids * (1 + 2**-20), mids * (1 - 2**-20), special])
    picks = pool[torch.randint(0, len(pool), (num_rows, head_dim), generator=g)]
    picks[: num_rows // 2, 0] = 448.0  # scale 1: the codes are the values' own
    picks[-4:] = torch.randn(4, head_dim, generator=g) * 3
    return picks


@pytest.mark.skipif(cpu_ext.load() is None, reason="CPU kernels could not be built")
def test_cpu_store_writes_the_reference_codes_for_edge_values() -> None:
    # V passes the rope untouched, so its rows reach the store as they are.
    num_heads, num_kv_heads, head_dim = 2, 2, 80  # not a power of two: stored unrotated
    qkv, cos, sin, _, _, _ = _rope_case(64, (num_heads, num_kv_heads, head_dim), 16,
                                        torch.float32)
    v_rows = _edge_rows(64 * num_kv_heads, head_dim, seed=1)
    qkv[:, (num_heads + num_kv_heads) * head_dim:] = v_rows.view(64, -1)
    slots = torch.arange(64)
    shape = (4, 16, num_kv_heads, row_width(head_dim))
    expected = [torch.zeros(shape, dtype=torch.uint8) for _ in range(2)]
    torch_rope_store(qkv.clone(), cos, sin, *expected, slots, num_heads, num_kv_heads,
                     head_dim)
    got = [torch.zeros(shape, dtype=torch.uint8) for _ in range(2)]
    cpu_ext.rotary_store_kv_(qkv, cos, sin, *got, slots, num_heads, num_kv_heads, head_dim)
    assert torch.equal(got[1], expected[1]) and torch.equal(got[0], expected[0])


def test_triton_store_writes_the_reference_codes_for_edge_values() -> None:
    k = _edge_rows(48, 80, seed=2).view(16, 3, 80)  # unrotated: the codes are the values'
    v = _edge_rows(48, 80, seed=3).view(16, 3, 80)
    slots = torch.tensor([5, 0, -1, 17, 9, 30, 2, 31, 1, 3, 4, 6, 7, 8, 10, 11])
    expected = [torch.zeros(4, 8, 3, 82, dtype=torch.uint8) for _ in range(2)]
    reference.store_kv(k, v, *expected, slots)
    got = [torch.zeros(4, 8, 3, 82, dtype=torch.uint8, device=KERNEL_DEVICE) for _ in range(2)]
    kv_ops.store_kv(k.to(KERNEL_DEVICE), v.to(KERNEL_DEVICE), *got, slots.to(KERNEL_DEVICE))
    assert torch.equal(got[0].cpu(), expected[0]) and torch.equal(got[1].cpu(), expected[1])


@pytest.mark.skipif(cpu_ext.load() is None, reason="CPU kernels could not be built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", [(9, 3, 64), (8, 2, 128), (6, 2, 80)])
def test_fused_rope_store_quantizes_like_the_reference(dtype: torch.dtype,
                                                       layout: tuple[int, int, int]) -> None:
    qkv, cos, sin, k_float, _, slots = _rope_case(24, layout, 16, dtype)
    shape = (*k_float.shape[:3], row_width(layout[2]))
    expected = [torch.zeros(shape, dtype=torch.uint8) for _ in range(2)]
    qkv_expected = torch_rope_store(qkv.clone(), cos, sin, *expected, slots, *layout)
    got = [torch.zeros(shape, dtype=torch.uint8) for _ in range(2)]
    cpu_ext.rotary_store_kv_(qkv, cos, sin, *got, slots, *layout)
    assert torch.equal(qkv, qkv_expected)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def _every_code_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A one-token context per sequence whose V row holds finite codes with a scale of 1.5:
    attention returns that row's values exactly (its softmax weight is 1; head_dim 80 is
    stored unrotated)."""
    head_dim = 80
    rows = FINITE_CODES.tolist() + FINITE_CODES[: 4 * head_dim - 254].tolist()
    v_codes = torch.tensor(rows, dtype=torch.uint8).view(4, 1, 1, head_dim)
    scale = torch.full((4, 1, 1, 1), 1.5, dtype=torch.float16).view(torch.uint8)
    v_cache = torch.cat([v_codes, scale.expand(4, 1, 1, 2)], dim=-1).contiguous()
    k_cache = quantize_rows(torch.randn(4, 1, 1, head_dim), "fp8")
    return k_cache, v_cache, dequantize_rows(v_cache, torch.float32).view(4, 1, head_dim)


def _decode_one_token(ops_call, k_cache: torch.Tensor, v_cache: torch.Tensor,  # type: ignore[no-untyped-def]
                      device: torch.device) -> torch.Tensor:
    q = torch.randn(4, 1, 80).to(device)
    tables = torch.arange(4, dtype=torch.int32).view(4, 1).to(device)
    lens = torch.ones(4, dtype=torch.int32, device=device)
    out = torch.empty_like(q)
    ops_call(q, k_cache.to(device), v_cache.to(device), tables, lens, 0.125, out=out)
    return out.cpu()


@pytest.mark.skipif(cpu_ext.load() is None, reason="CPU kernels could not be built")
def test_cpu_decode_reads_every_code_exactly() -> None:
    k_cache, v_cache, expected = _every_code_case()
    got = _decode_one_token(cpu_ext.paged_decode_attention, k_cache, v_cache,
                            torch.device("cpu"))
    assert torch.equal(got, expected)


def test_triton_decode_reads_every_code_exactly() -> None:
    k_cache, v_cache, expected = _every_code_case()
    got = _decode_one_token(paged_attention.paged_decode_attention, k_cache, v_cache,
                            KERNEL_DEVICE)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_decode_reads_fp8_as_its_dequantized_values(dtype: torch.dtype) -> None:
    q, k, v, tables, lens, expected = decode_case(dtype, 3, 64, "fp8")
    assert torch.equal(reference.paged_decode_attention(q, k, v, tables, lens, 0.125), expected)


@pytest.mark.skipif(cpu_ext.load() is None, reason="CPU kernels could not be built")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("group", "head_dim"), [(1, 64), (3, 64), (4, 48)])
def test_cpu_decode_dequantizes_in_place(dtype: torch.dtype, group: int, head_dim: int) -> None:
    q, k, v, tables, lens, expected = decode_case(dtype, group, head_dim, "fp8")
    out = torch.empty_like(q)
    cpu_ext.paged_decode_attention(q, k, v, tables, lens, 0.125, out=out)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [1, 3])
def test_triton_decode_dequantizes_in_place(dtype: torch.dtype, splits: int) -> None:
    q, k, v, tables, lens, expected = decode_case(dtype, 3, 64, "fp8")
    dev = KERNEL_DEVICE
    out = paged_attention.paged_decode_attention(
        q.to(dev), k.to(dev), v.to(dev), tables.to(dev), lens.to(dev), 0.125, num_splits=splits)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float().cpu(), expected.float(), rtol=tol, atol=tol)


def test_pack_and_unpack_move_rows_with_their_scales() -> None:
    g = torch.Generator().manual_seed(3)
    k = quantize_rows(torch.randn(6, 8, 2, 64, generator=g), "fp8")
    v = quantize_rows(torch.randn(6, 8, 2, 64, generator=g), "fp8")
    ids = torch.tensor([4, 1])
    buffer = torch.empty(2, 2, 8, 2, 66, dtype=torch.uint8)
    for ops in (reference, kv_ops):
        dst_k, dst_v = torch.zeros_like(k), torch.zeros_like(v)
        ops.pack_kv(k, v, ids, buffer)
        ops.unpack_kv(buffer, dst_k, dst_v, torch.tensor([0, 5]))
        assert torch.equal(dst_k[0], k[4]) and torch.equal(dst_v[5], v[1])
