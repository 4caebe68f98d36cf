"""Triton KV-cache writes and block gather/scatter for KV transfer.

Layouts (one layer):
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]  (head_dim contiguous)
    k, v (new tokens): [num_tokens, num_kv_heads, head_dim]
    slot mapping:      [num_tokens], slot = block_id * block_size + offset; negative = skip
    transfer buffer:   [2, n, block_size, num_kv_heads, head_dim], contiguous, cache dtype

Every program moves one token's [num_kv_heads, head_dim] tile of K and of V, addressing the
cache through its strides, so caches that are views of a larger pool work unchanged. An
int8 or fp8 cache (kernels.kv_quant: rows of head_dim int8 values or e4m3 codes, stored as
uint8, and an fp16 scale) is quantized by the store; pack/unpack copy its rows, scales
included, as bytes; a bf16 or fp16 cache under wider K/V gets them rounded to nearest even
(round_to). The e4m3 codes are computed arithmetically (exact round-to-nearest-even,
as torch's conversion): the Triton interpreter's fp32 -> float8e4nv cast rounds wrongly
where the mantissa carries into the next exponent (124.2 -> 64, not 128).
References: `kernels.reference.store_kv / pack_kv / unpack_kv`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels import kv_quant
from splitserve.kernels.kv_quant import hadamard_matrix, kernel_codec, rotates, row_width

_FP8_MAX = tl.constexpr(kv_quant.FP8_MAX)
_FP8_ROW_LIMIT = tl.constexpr(kv_quant.FP8_ROW_LIMIT)

__all__ = ["ROUND_CODES", "cache_round", "pack_kv", "round_to", "store_kv", "unpack_kv"]

# How an fp32 value is rounded to a dtype (round_to's ROUND): 0 fp32 (not at all), 1 bf16,
# 2 fp16.
ROUND_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def round_to(x, ROUND: tl.constexpr):
    """fp32 -> the fp32 value of x rounded to nearest even in the dtype (ROUND_CODES).
    bf16 by its bits: the Triton interpreter's fp32 -> bf16 cast truncates."""
    if ROUND == 1:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    elif ROUND == 2:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


def cache_round(dtype: torch.dtype, cache_dtype: torch.dtype) -> int:
    """The ROUND code for values of `dtype` stored into a float cache of `cache_dtype`: 0
    where the cast is exact (same dtype, or a quantized cache: its own codec)."""
    if cache_dtype == dtype or cache_dtype not in ROUND_CODES:
        return 0
    return ROUND_CODES[cache_dtype]


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, kcs_ptr, vcs_ptr, h_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    BLOCK_SIZE: tl.constexpr, NUM_HEADS: tl.constexpr, H_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CODEC: tl.constexpr, ROTATE: tl.constexpr,
    CACHE_ROUND: tl.constexpr,
):
    tok = tl.program_id(0)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    h = tl.arange(0, H_PAD)
    d = tl.arange(0, D_PAD)
    mask = (h < NUM_HEADS)[:, None] & (d < HEAD_DIM)[None, :]
    k = tl.load(k_ptr + tok * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(v_ptr + tok * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    k_row = block * stride_kcb + offset * stride_kcs + h * stride_kch  # [H_PAD]
    v_row = block * stride_vcb + offset * stride_vcs + h * stride_vch
    if CODEC != 0:
        if ROTATE:  # rows are stored as H x (kernels.kv_quant); h_ptr: H, fp32 [D, D]
            hm = tl.load(h_ptr + d[:, None] * HEAD_DIM + d[None, :])
            k = tl.dot(k.to(tl.float32), hm, input_precision="ieee")
            v = tl.dot(v.to(tl.float32), hm, input_precision="ieee")
        if CODEC == 1:
            k, k_scale = _quantize_rows(k)
            v, v_scale = _quantize_rows(v)
        else:
            k, k_scale = _quantize_rows_fp8(k)
            v, v_scale = _quantize_rows_fp8(v)
        # The fp16 scale sits right after the row's values; kcs/vcs are fp16 views.
        h_ok = h < NUM_HEADS
        tl.store(kcs_ptr + (k_row + HEAD_DIM) // 2, k_scale, mask=h_ok)
        tl.store(vcs_ptr + (v_row + HEAD_DIM) // 2, v_scale, mask=h_ok)
    elif CACHE_ROUND != 0:  # a bf16 / fp16 cache under wider (or other half) K/V
        k = round_to(k.to(tl.float32), CACHE_ROUND)
        v = round_to(v.to(tl.float32), CACHE_ROUND)
    tl.store(kc_ptr + k_row[:, None] + d[None, :], k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + v_row[:, None] + d[None, :], v.to(vc_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _quantize_rows(x):
    """[H, D] floats -> (int8-valued fp32 [H, D], fp16 scale [H]), as kernels.kv_quant:
    scale = fp16(max |x| / 127), values round-half-even(x / scale) clamped to +-127."""
    x = x.to(tl.float32)
    scale = (tl.max(tl.abs(x), 1) / 127.0).to(tl.float16)
    safe = tl.where(scale > 0, scale.to(tl.float32), 1.0)
    r = _round_half_even(x / safe[:, None])
    return tl.minimum(tl.maximum(r, -127.0), 127.0), scale


@triton.jit
def _round_half_even(y):
    f = tl.floor(y)
    frac = y - f
    parity = f - 2.0 * tl.floor(f * 0.5)  # 1 for odd f: a tie rounds to the even neighbour
    return tl.where(frac > 0.5, f + 1.0, tl.where(frac < 0.5, f, f + parity))


@triton.jit
def _quantize_rows_fp8(x):
    """[H, D] floats -> (int32 e4m3 codes [H, D], fp16 scale [H]), as kernels.kv_quant:
    NaN -> 0, clamped to +-FP8_ROW_LIMIT, scale = fp16(max |x| / 448), codes of x / scale
    clamped to +-448."""
    x = x.to(tl.float32)
    x = tl.where(x != x, 0.0, x)
    x = tl.minimum(tl.maximum(x, -_FP8_ROW_LIMIT), _FP8_ROW_LIMIT)
    scale = (tl.max(tl.abs(x), 1) / _FP8_MAX).to(tl.float16)
    safe = tl.where(scale > 0, scale.to(tl.float32), 1.0)
    y = tl.minimum(tl.maximum(x / safe[:, None], -_FP8_MAX), _FP8_MAX)
    # code = (e + 6) * 8 + rne(|y| * 2^(3 - e)), e = max(exponent of |y|, -6) (the subnormal
    # range shares 2^-6's step); a rounding up to 16 carries into the exponent by itself.
    bits = y.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    step = ((130 - e) << 23).to(tl.float32, bitcast=True)  # 2^(3 - e), exact
    r = _round_half_even(tl.abs(y) * step).to(tl.int32)
    sign = (bits >> 31) & 1
    return sign * 128 + (e + 6) * 8 + r, scale


@triton.jit
def _copy_blocks_kernel(
    buf_ptr, kc_ptr, vc_ptr, ids_ptr,
    stride_buf_kv, stride_buf_n, stride_buf_s, stride_buf_h,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    TO_BUFFER: tl.constexpr, NUM_HEADS: tl.constexpr, H_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
):
    # program (i, s): slot s of the i-th listed block.
    i = tl.program_id(0)
    s = tl.program_id(1)
    block = tl.load(ids_ptr + i).to(tl.int64)
    h = tl.arange(0, H_PAD)
    d = tl.arange(0, D_PAD)
    mask = (h < NUM_HEADS)[:, None] & (d < HEAD_DIM)[None, :]
    tile = h[:, None] * stride_buf_h + d[None, :]
    buf_k = buf_ptr + i.to(tl.int64) * stride_buf_n + s * stride_buf_s + tile
    buf_v = buf_k + stride_buf_kv
    kc = kc_ptr + block * stride_kcb + s * stride_kcs + h[:, None] * stride_kch + d[None, :]
    vc = vc_ptr + block * stride_vcb + s * stride_vcs + h[:, None] * stride_vch + d[None, :]
    if TO_BUFFER:
        tl.store(buf_k, tl.load(kc, mask=mask), mask=mask)
        tl.store(buf_v, tl.load(vc, mask=mask), mask=mask)
    else:
        tl.store(kc, tl.load(buf_k, mask=mask), mask=mask)
        tl.store(vc, tl.load(buf_v, mask=mask), mask=mask)


def _check_caches(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, (k_cache.shape, v_cache.shape)
    assert k_cache.dtype == v_cache.dtype and k_cache.device == v_cache.device
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1, "head_dim must be contiguous"


def _tile_meta(k_cache: torch.Tensor) -> dict[str, int]:
    _, _, num_heads, head_dim = k_cache.shape
    return {
        "NUM_HEADS": num_heads,
        "H_PAD": triton.next_power_of_2(num_heads),
        "HEAD_DIM": head_dim,
        "D_PAD": triton.next_power_of_2(head_dim),
    }


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write k, v [num_tokens, num_kv_heads, head_dim] into their slots, in place (an int8
    or fp8 cache: quantized)."""
    _check_caches(k_cache, v_cache)
    codec = kernel_codec(k_cache.dtype)
    quant = codec != 0
    width = row_width(k.shape[2]) if quant else k.shape[2]
    assert k.shape == v.shape and k.dim() == 3 and (k.shape[1], width) == k_cache.shape[2:], (
        k.shape, k_cache.shape)
    assert k.stride(2) == 1 and v.stride(2) == 1, "head_dim must be contiguous"
    assert slot_mapping.shape == (k.shape[0],), (slot_mapping.shape, k.shape)
    assert slot_mapping.dtype in (torch.int32, torch.int64), slot_mapping.dtype
    assert k.device == v.device == slot_mapping.device == k_cache.device
    if k.shape[0] == 0:
        return
    meta = _tile_meta(k_cache)
    rotate = rotates(k_cache.dtype, k.shape[2])
    meta.update(HEAD_DIM=k.shape[2], D_PAD=triton.next_power_of_2(k.shape[2]))
    if rotate:  # the rotation is a tl.dot, which needs 16 rows
        meta["H_PAD"] = max(16, meta["H_PAD"])
    h_matrix = hadamard_matrix(k.shape[2], k.device) if rotate else k_cache
    # fp16 views for the scales (unused for float caches: any tensor will do).
    k_scales = k_cache.view(torch.float16) if quant else k_cache
    v_scales = v_cache.view(torch.float16) if quant else v_cache
    _store_kv_kernel[(k.shape[0],)](
        k, v, k_cache, v_cache, k_scales, v_scales, h_matrix, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[1], CODEC=codec, ROTATE=rotate,
        CACHE_ROUND=cache_round(k.dtype, k_cache.dtype), **meta,
    )


def _copy_blocks(
    buffer: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_ids: torch.Tensor,
    to_buffer: bool,
) -> None:
    _check_caches(k_cache, v_cache)
    assert block_ids.dim() == 1 and block_ids.dtype in (torch.int32, torch.int64), block_ids
    n = block_ids.shape[0]
    expected = (2, n, *k_cache.shape[1:])
    assert tuple(buffer.shape) == expected, (tuple(buffer.shape), expected)
    assert buffer.dtype == k_cache.dtype and buffer.is_contiguous()
    assert buffer.device == k_cache.device == block_ids.device
    if n == 0:
        return
    _copy_blocks_kernel[(n, k_cache.shape[1])](
        buffer, k_cache, v_cache, block_ids,
        buffer.stride(0), buffer.stride(1), buffer.stride(2), buffer.stride(3),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        TO_BUFFER=to_buffer, **_tile_meta(k_cache),
    )


def pack_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_ids: torch.Tensor,
    buffer: torch.Tensor,
) -> torch.Tensor:
    """Gather blocks `block_ids` [n] into `buffer` [2, n, block_size, num_kv_heads, head_dim]."""
    _copy_blocks(buffer, k_cache, v_cache, block_ids, to_buffer=True)
    return buffer


def unpack_kv(
    buffer: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_ids: torch.Tensor,
) -> None:
    """Scatter `buffer` [2, n, block_size, num_kv_heads, head_dim] into blocks `block_ids`."""
    _copy_blocks(buffer, k_cache, v_cache, block_ids, to_buffer=False)
