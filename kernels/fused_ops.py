"""Triton fused elementwise ops of a decoder layer: the GPU side of `FusedLayerOps`.

Same signatures and results as kernels.cpu_ext's (the C++ CPU versions): each replaces a
chain of torch ops in engine/model.py and rounds wherever that chain stores a tensor of the
model's dtype, so the fused layer computes what DecoderLayer.forward does. Math is fp32.

    qkv:              [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim], q | k | v heads
    cos, sin:         [num_tokens, head_dim] or [num_tokens, 1, head_dim] (rope table rows)
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim] (int8/fp8: head_dim + 2)
    slot_mapping:     int32/int64 [num_tokens], block_id * block_size + offset; negative = skip
    gate_up:          [num_tokens, 2 * n] -> out [num_tokens, n]
    x, residual, out: [num_tokens, hidden]; weight: [hidden]

Rounding to bf16 is done with integer ops on the fp32 bits (round to nearest even, as
torch): the Triton interpreter's fp32 -> bf16 cast truncates. Launches pass
enable_fp_fusion=False so a*b + c is never contracted into an FMA (torch rounds the
product first). Divisions and square roots are the IEEE ones (div_rn, sqrt_rn); exp is
Triton's, so silu may differ from torch's by its exp (fp32: a few ulp; half types: rarely
one ulp). RMSNorm sums its row as a tree, not in torch's order, so fp32 results may differ
from torch's by a few ulp (an ulp of the sum can move 1/sqrt by two); half types round the
norm before the weight, which hides that almost always. Rope + KV store is bit-exact.
Nothing here syncs with the host or allocates beyond an `out` the caller did not pass, so
the ops can be captured in a CUDA graph. Programs take several token rows where rows are
small (heuristics below, pure functions of the shapes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels import kv_ops
from splitserve.kernels.kv_quant import HALF_CACHE_DTYPES, is_quantized

__all__ = ["rotary_store_kv_", "silu_and_mul", "rms_norm", "add_rms_norm_"]

# ROUND constexpr: how an fp32 result is rounded to the model's dtype (kv_ops.round_to).
_ROUND = kv_ops.ROUND_CODES
_MAX_NORM_BLOCK = 1 << 16  # RMSNorm keeps a whole row in one tile
_round = kv_ops.round_to


@triton.jit
def _rotary_store_kv_kernel(
    qkv_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr, num_tokens,
    stride_qkv, stride_cos, stride_sin,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    NUM_ROWS: tl.constexpr, NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, STORE: tl.constexpr, ROUND: tl.constexpr,
    CACHE_ROUND: tl.constexpr,
):
    # A row is one head of one token: rows t * NUM_ROWS + h, h over qkv's q | k | v heads
    # (without STORE only the q and k heads); program a takes rows [a * BLOCK_R, ...). Each
    # thread loads, rotates and stores the same (row, j) element of both halves, so the
    # in-place write never races with another thread's read.
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    tok = (r // NUM_ROWS).to(tl.int64)
    h = r % NUM_ROWS
    j = tl.arange(0, HALF_PAD)
    row_ok = tok < num_tokens
    mask = row_ok[:, None] & (j < HALF)[None, :]  # [BLOCK_R, HALF_PAD]
    lo = qkv_ptr + tok[:, None] * stride_qkv + h[:, None] * (2 * HALF) + j[None, :]
    x1 = tl.load(lo, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(lo + HALF, mask=mask, other=0.0).to(tl.float32)
    cos = cos_ptr + tok[:, None] * stride_cos + j[None, :]
    sin = sin_ptr + tok[:, None] * stride_sin + j[None, :]
    c1 = tl.load(cos, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin + HALF, mask=mask, other=0.0).to(tl.float32)
    # apply_rope: x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]; every product
    # and the sum rounded to the dtype like torch's three elementwise ops.
    o1 = _round(_round(x1 * c1, ROUND) - _round(x2 * s1, ROUND), ROUND)
    o2 = _round(_round(x2 * c2, ROUND) + _round(x1 * s2, ROUND), ROUND)
    rotated = (h < NUM_HEADS + NUM_KV_HEADS)[:, None]
    o1 = tl.where(rotated, o1, x1)  # v heads pass through
    o2 = tl.where(rotated, o2, x2)
    dtype = qkv_ptr.dtype.element_ty
    tl.store(lo, o1.to(dtype), mask=mask & rotated)
    tl.store(lo + HALF, o2.to(dtype), mask=mask & rotated)
    if STORE:
        slot = tl.load(slot_ptr + tok, mask=row_ok, other=-1).to(tl.int64)
        block = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        stored = mask & (slot >= 0)[:, None]
        is_k = stored & (h >= NUM_HEADS)[:, None] & rotated
        is_v = stored & (h >= NUM_HEADS + NUM_KV_HEADS)[:, None]
        k_row = block * stride_kcb + offset * stride_kcs + (h - NUM_HEADS) * stride_kch
        v_head = h - NUM_HEADS - NUM_KV_HEADS
        v_row = block * stride_vcb + offset * stride_vcs + v_head * stride_vch
        k_dst = kc_ptr + k_row[:, None] + j[None, :]
        v_dst = vc_ptr + v_row[:, None] + j[None, :]
        # o1, o2 hold values of qkv's dtype: a bf16 / fp16 cache under a wider qkv rounds
        # them once more (CACHE_ROUND), as Tensor.to does in the reference store.
        cache_dtype = kc_ptr.dtype.element_ty
        c1, c2 = _round(o1, CACHE_ROUND).to(cache_dtype), _round(o2, CACHE_ROUND).to(cache_dtype)
        tl.store(k_dst, c1, mask=is_k)
        tl.store(k_dst + HALF, c2, mask=is_k)
        tl.store(v_dst, c1, mask=is_v)
        tl.store(v_dst + HALF, c2, mask=is_v)


@triton.jit
def _silu_and_mul_kernel(
    in_ptr, out_ptr, num_tokens, n, stride_in, stride_out,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, ROUND: tl.constexpr,
):
    # program (a, b): columns [b * BLOCK, (b + 1) * BLOCK) of tokens [a * ROWS, (a + 1) * ROWS).
    tok = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (tok < num_tokens)[:, None] & (cols < n)[None, :]
    gate_ptr = in_ptr + tok[:, None] * stride_in + cols[None, :]  # [ROWS, BLOCK]
    gate = tl.load(gate_ptr, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptr + n, mask=mask, other=0.0).to(tl.float32)
    # F.silu(gate) * up: silu(g) = g / (1 + exp(-g)), rounded to the dtype, then the product.
    silu = _round(tl.math.div_rn(gate, 1.0 + tl.exp(-gate)), ROUND)
    out = _round(silu * up, ROUND)
    dst = out_ptr + tok[:, None] * stride_out + cols[None, :]
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, num_tokens, stride_x, stride_res, stride_out, eps,
    N: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, ADD: tl.constexpr,
    ROUND: tl.constexpr,
):
    # program a: rows [a * ROWS, (a + 1) * ROWS), each whole in BLOCK >= N columns. ADD:
    # residual <- round(residual + x), then normalize that.
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (row < num_tokens)[:, None] & (cols < N)[None, :]
    x = tl.load(x_ptr + row[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)  # [ROWS, BLOCK]
    if ADD:
        res = res_ptr + row[:, None] * stride_res + cols[None, :]
        x = _round(tl.load(res, mask=mask, other=0.0).to(tl.float32) + x, ROUND)
        tl.store(res, x.to(res_ptr.dtype.element_ty), mask=mask)
    # RMSNorm.forward: r = 1 / sqrt(mean(x^2) + eps); fp32: (x * r) * w (F.rms_norm); half
    # types: the fp32 norm rounded to the dtype, then times the weight in the dtype.
    mean = tl.math.div_rn(tl.sum(x * x, axis=1), N * 1.0)
    r = tl.math.div_rn(1.0, tl.sqrt_rn(mean + eps))[:, None]
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    out = _round(_round(x * r, ROUND) * w, ROUND)
    dst = out_ptr + row[:, None] * stride_out + cols[None, :]
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=mask)


def _check_rows(t: torch.Tensor, name: str) -> None:
    assert t.dim() == 2 and t.stride(1) == 1, f"{name} must be [num_tokens, n] with stride 1"
    assert t.dtype in _ROUND, f"{name}: unsupported dtype {t.dtype}"


def rotary_rows_per_program(head_dim: int) -> int:
    """(token, head) rows one rope program takes: half-tiles of 2048 elements."""
    return max(1, 2048 // triton.next_power_of_2(head_dim // 2))


def rotary_store_kv_(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> None:
    """Rope on the q and k heads of `qkv` in place, then its k and v heads into the caches
    (engine.model.apply_rope on the q and k heads, then kernels.kv_ops.store_kv). A float
    cache is written by the same kernel; an int8/fp8 one by kv_ops.store_kv afterwards."""
    _check_rows(qkv, "qkv")
    num_tokens = qkv.shape[0]
    assert head_dim > 0 and head_dim % 2 == 0, f"head_dim must be even, got {head_dim}"
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    assert qkv.shape[1] == q_size + 2 * kv_size, (qkv.shape, num_heads, num_kv_heads, head_dim)
    for table in (cos, sin):
        rows = table.dim() == 2 or (table.dim() == 3 and table.shape[1] == 1)
        assert rows and table.shape[0] == num_tokens and table.shape[-1] == head_dim, table.shape
        assert table.stride(-1) == 1 and table.dtype == qkv.dtype, "cos/sin: rows of qkv's dtype"
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, (k_cache.shape, v_cache.shape)
    assert k_cache.dtype == v_cache.dtype and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    quantized = is_quantized(k_cache)
    assert quantized or k_cache.dtype in (qkv.dtype, *HALF_CACHE_DTYPES), (k_cache.dtype, qkv.dtype)
    assert slot_mapping.shape == (num_tokens,), (slot_mapping.shape, num_tokens)
    assert slot_mapping.dtype in (torch.int32, torch.int64), slot_mapping.dtype
    assert qkv.device == cos.device == sin.device == k_cache.device == slot_mapping.device
    if num_tokens == 0:
        return
    num_rows = num_heads + num_kv_heads + (0 if quantized else num_kv_heads)
    if not quantized:
        assert k_cache.shape[2:] == (num_kv_heads, head_dim), (k_cache.shape, num_kv_heads)
    block_r = rotary_rows_per_program(head_dim)
    _rotary_store_kv_kernel[(triton.cdiv(num_tokens * num_rows, block_r),)](
        qkv, cos, sin, k_cache, v_cache, slot_mapping, num_tokens,
        qkv.stride(0), cos.stride(0), sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_ROWS=num_rows, NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
        HALF=head_dim // 2, HALF_PAD=triton.next_power_of_2(head_dim // 2), BLOCK_R=block_r,
        BLOCK_SIZE=k_cache.shape[1], STORE=not quantized, ROUND=_ROUND[qkv.dtype],
        CACHE_ROUND=kv_ops.cache_round(qkv.dtype, k_cache.dtype), enable_fp_fusion=False,
    )
    if quantized:  # the rotated k and v heads, as views of qkv
        k = qkv[:, q_size : q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
        v = qkv[:, q_size + kv_size :].view(num_tokens, num_kv_heads, head_dim)
        kv_ops.store_kv(k, v, k_cache, v_cache, slot_mapping)


def silu_and_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[num_tokens, 2 * n] -> F.silu(gate_up[:, :n]) * gate_up[:, n:], [num_tokens, n]."""
    _check_rows(gate_up, "gate_up")
    num_tokens, n = gate_up.shape[0], gate_up.shape[1] // 2
    if out is None:
        out = gate_up.new_empty(num_tokens, n)
    _check_rows(out, "out")
    assert out.shape == (num_tokens, n) and gate_up.shape[1] == 2 * n, (gate_up.shape, out.shape)
    assert out.dtype == gate_up.dtype and out.device == gate_up.device
    if num_tokens == 0 or n == 0:
        return out
    block = min(1024, triton.next_power_of_2(n))
    rows = rows_per_program(block)
    _silu_and_mul_kernel[(triton.cdiv(num_tokens, rows), triton.cdiv(n, block))](
        gate_up, out, num_tokens, n, gate_up.stride(0), out.stride(0),
        ROWS=rows, BLOCK=block, ROUND=_ROUND[gate_up.dtype], enable_fp_fusion=False,
    )
    return out


def rows_per_program(block: int) -> int:
    """Token rows a silu or RMSNorm program takes, `block` (a power of two) columns each:
    tiles of at least 4096 elements, so small hidden sizes do not launch a program a row."""
    return max(1, 4096 // block)


def norm_num_warps(tile: int) -> int:
    """Warps for an RMSNorm program of `tile` elements (a power of two)."""
    return 16 if tile >= 8192 else 8 if tile >= 2048 else 4


def _norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
          out: torch.Tensor) -> None:
    _check_rows(x, "x")
    _check_rows(out, "out")
    hidden = x.shape[1]
    assert weight.shape == (hidden,) and weight.is_contiguous(), (weight.shape, hidden)
    assert out.shape == x.shape and weight.dtype == out.dtype == x.dtype
    assert weight.device == out.device == x.device
    if residual is not None:
        _check_rows(residual, "residual")
        assert residual.shape == x.shape and residual.dtype == x.dtype
        assert residual.device == x.device
    block = triton.next_power_of_2(hidden)
    assert block <= _MAX_NORM_BLOCK, f"hidden size {hidden} too large"
    if x.shape[0] == 0:
        return
    res = residual if residual is not None else x  # unused without ADD
    rows = rows_per_program(block)
    _rms_norm_kernel[(triton.cdiv(x.shape[0], rows),)](
        x, res, weight, out, x.shape[0], x.stride(0), res.stride(0), out.stride(0), float(eps),
        N=hidden, ROWS=rows, BLOCK=block, ADD=residual is not None, ROUND=_ROUND[x.dtype],
        num_warps=norm_num_warps(rows * block), enable_fp_fusion=False,
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """engine.model.RMSNorm.forward: x, out [num_tokens, hidden]; weight [hidden]."""
    if out is None:
        out = torch.empty_like(x)
    _norm(x, None, weight, eps, out)
    return out


def add_rms_norm_(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                  eps: float) -> None:
    """In place: residual <- residual + x, then x <- RMSNorm(residual) (weight [hidden]).

    x, residual: [num_tokens, hidden], not overlapping; the add rounds to the dtype like
    `h = x + o_proj(...)`.
    """
    _norm(x, residual, weight, eps, x)
