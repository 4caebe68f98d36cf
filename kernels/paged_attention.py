"""Triton paged decode attention (flash-decoding with split-K), GQA-aware.

Stage 1 runs one program per (sequence, kv head, split). The program loads the query
heads of its kv group as one [GROUP_PAD, D_PAD] tile, so each KV token is read once per
kv head, walks its share of the context BLOCK_N tokens at a time (per-token addressing
through the block table, so any block size works) with an online softmax, and writes
either the final output (one split) or a normalized partial plus its log-sum-exp.
Stage 2 merges the partials of every (sequence, head) with log-sum-exp weights.

Partitioning (both stages agree): a sequence of context length L with S splits gives each
split `tokens_per_split = ceil(ceil(L / S) / BLOCK_N) * BLOCK_N` tokens; splits past the end
are empty and ignored by stage 2, so a batch mixing short and long sequences is fine.

Quantized caches (kernels.kv_quant) are dequantized as they are read: the dots run on the
decoded values and each row's fp16 scale multiplies its score and its softmax weight. fp8
rows (e4m3 codes in uint8) are decoded by moving each code's bits into an fp16 (sign to bit
15, exponent and mantissa up by 7): the same value divided by 2^8, subnormals included, on
every GPU and in the interpreter (whose float8e4nv cast reads the NaN codes as 480), then
times 2^8 (exact).

Reference: `kernels.reference.paged_decode_attention`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels.attention_plan import (
    MAX_SPLITS,
    AttentionScratch,
    alloc_scratch,
    choose_block_n,
    choose_num_splits,
)
from splitserve.kernels.kv_quant import (
    HALF_CACHE_DTYPES,
    hadamard_matrix,
    kernel_codec,
    rotates,
    row_width,
)

__all__ = [
    "MAX_SPLITS",
    "AttentionScratch",
    "alloc_scratch",
    "choose_block_n",
    "choose_num_splits",
    "paged_decode_attention",
    "plan_num_splits",
]

_LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, h_ptr, bt_ptr, lens_ptr, out_ptr, po_ptr, plse_ptr,
    qk_scale,  # softmax scale * log2(e): scores are kept in base 2
    stride_qs, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bts,
    stride_os, stride_oh,
    stride_pos, stride_poh, stride_posp,
    stride_ls, stride_lh,
    num_splits,
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr, DOT_FP32: tl.constexpr, CODEC: tl.constexpr,
    ROTATE: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx_len = tl.load(lens_ptr + seq)
    per_split = tl.cdiv(tl.cdiv(ctx_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    if start >= ctx_len:
        return
    end = tl.minimum(start + per_split, ctx_len)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D_PAD)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    heads = kv_head * GROUP + g
    q = tl.load(
        q_ptr + seq * stride_qs + heads[:, None] * stride_qh + d[None, :],
        mask=g_ok[:, None] & d_ok[None, :], other=0.0,
    )  # [GROUP_PAD, D_PAD]
    if ROTATE:  # rows stored as H x: rotate the query in (and the output back below)
        hm = tl.load(h_ptr + d[:, None] * HEAD_DIM + d[None, :])
        q = tl.dot(q.to(tl.float32), hm, input_precision="ieee").to(q.dtype)
    if DOT_FP32:
        q = q.to(tl.float32)

    m = tl.full([GROUP_PAD], -1.0e30, dtype=tl.float32)
    lsum = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], dtype=tl.float32)
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bts
    for tile in range(start, end, BLOCK_N):
        t = tile + tl.arange(0, BLOCK_N)
        t_ok = t < end
        block = tl.load(bt_row + t // BLOCK_SIZE, mask=t_ok, other=0).to(tl.int64)
        slot = t % BLOCK_SIZE
        kv_mask = t_ok[:, None] & d_ok[None, :]
        k_off = block * stride_kb + slot * stride_kt + kv_head * stride_kh
        k = tl.load(k_ptr + k_off[:, None] + d[None, :], mask=kv_mask, other=0)  # [BLOCK_N, D_PAD]
        if CODEC == 2:
            k = _e4m3_values(k)
        if DOT_FP32:
            k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k.to(q.dtype)))
        if CODEC != 0:  # each token's fp16 scale follows its values (ks: fp16 view)
            k_scale = tl.load(ks_ptr + (k_off + HEAD_DIM) // 2, mask=t_ok, other=0.0)
            s = s * k_scale.to(tl.float32)[None, :]
        s = tl.where(t_ok[None, :], s * qk_scale, float("-inf"))  # [GROUP_PAD, BLOCK_N]
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        lsum = lsum * alpha + tl.sum(p, 1)
        v_off = block * stride_vb + slot * stride_vt + kv_head * stride_vh
        v = tl.load(v_ptr + v_off[:, None] + d[None, :], mask=kv_mask, other=0)
        if CODEC == 2:
            v = _e4m3_values(v)
        pw = p
        if CODEC != 0:
            v_scale = tl.load(vs_ptr + (v_off + HEAD_DIM) // 2, mask=t_ok, other=0.0)
            pw = p * v_scale.to(tl.float32)[None, :]
        if DOT_FP32:
            pv = tl.dot(pw, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(pw.to(q.dtype), v.to(q.dtype))
        acc = acc * alpha[:, None] + pv
        m = m_new

    acc = acc / lsum[:, None]
    if ROTATE:
        acc = tl.dot(acc, hm, input_precision="ieee")
    io_mask = g_ok[:, None] & d_ok[None, :]
    if SINGLE_SPLIT:
        o_ptrs = out_ptr + seq * stride_os + heads[:, None] * stride_oh + d[None, :]
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=io_mask)
    else:
        po_ptrs = (po_ptr + seq * stride_pos + heads[:, None] * stride_poh
                   + split * stride_posp + d[None, :])
        tl.store(po_ptrs, acc, mask=io_mask)
        tl.store(plse_ptr + seq * stride_ls + heads * stride_lh + split, m + tl.log2(lsum), mask=g_ok)


@triton.jit
def _e4m3_values(codes):
    """uint8 e4m3fn codes -> fp32 values, exact: as fp16 bits they read as value / 2^8
    (e4m3's exponent bias is 7, fp16's 15), subnormals included."""
    c = codes.to(tl.uint16)
    half = (((c & 0x7F) << 7) | ((c & 0x80) << 8)).to(tl.float16, bitcast=True)
    return half.to(tl.float32) * 256.0


@triton.jit
def _reduce_splits_kernel(
    lens_ptr, out_ptr, po_ptr, plse_ptr,
    stride_os, stride_oh,
    stride_pos, stride_poh, stride_posp,
    stride_ls, stride_lh,
    num_splits,
    BLOCK_N: tl.constexpr, SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    ctx_len = tl.load(lens_ptr + seq)
    per_split = tl.cdiv(tl.cdiv(ctx_len, num_splits), BLOCK_N) * BLOCK_N
    used = tl.cdiv(ctx_len, per_split)
    sp = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, D_PAD)
    sp_ok = sp < used
    lse = tl.load(plse_ptr + seq * stride_ls + head * stride_lh + sp, mask=sp_ok, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))  # [SPLITS_PAD], 0 for unused splits
    po = tl.load(
        po_ptr + seq * stride_pos + head * stride_poh + sp[:, None] * stride_posp + d[None, :],
        mask=sp_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0,
    )  # [SPLITS_PAD, D_PAD]
    o = tl.sum(po * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out_ptr + seq * stride_os + head * stride_oh + d, o.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


def _check_args(q, k_cache, v_cache, block_tables, context_lens, out) -> None:
    assert q.dim() == 3 and k_cache.dim() == 4, (q.shape, k_cache.shape)
    assert k_cache.shape == v_cache.shape, (k_cache.shape, v_cache.shape)
    quant = kernel_codec(k_cache.dtype) != 0
    float_cache = k_cache.dtype in (q.dtype, *HALF_CACHE_DTYPES)
    assert k_cache.dtype == v_cache.dtype and (quant or float_cache), (
        q.dtype, k_cache.dtype, v_cache.dtype)
    assert q.dtype in (torch.float32, torch.float16, torch.bfloat16), q.dtype
    width = row_width(q.shape[2]) if quant else q.shape[2]  # quantized rows end with a scale
    assert width == k_cache.shape[3] and q.shape[2] >= 16, (q.shape, k_cache.shape)
    assert q.shape[1] % k_cache.shape[2] == 0, (q.shape, k_cache.shape)
    for t in (q, k_cache, v_cache, out):
        assert t.stride(-1) == 1, "head_dim must be contiguous"
    assert block_tables.dim() == 2 and block_tables.shape[0] == q.shape[0]
    assert block_tables.dtype in (torch.int32, torch.int64), block_tables.dtype
    assert block_tables.stride(1) == 1, "block table rows must be contiguous"
    assert context_lens.shape == (q.shape[0],) and context_lens.dtype in (torch.int32, torch.int64)
    assert out.shape == q.shape and out.dtype == q.dtype, (out.shape, out.dtype)
    devices = {t.device for t in (q, k_cache, v_cache, block_tables, context_lens, out)}
    assert len(devices) == 1, devices


def _dot_in_fp32(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """fp32 queries take exact (non-TF32) fp32 dots, over an fp32 cache or a bf16 / fp16
    one. On CPU (the Triton interpreter, whose bf16 tl.dot is wrong) half-precision tiles
    are upcast too, and on GPU where the cache is the other half type (no exact cast
    between them); otherwise they stay half."""
    other_half = k_cache.dtype in HALF_CACHE_DTYPES and k_cache.dtype != q.dtype
    return q.dtype == torch.float32 or q.device.type != "cuda" or other_half


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def plan_num_splits(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_tables: torch.Tensor,
    num_splits: int | None = None,
    max_context_len: int | None = None,
) -> int:
    """The split count a call will use: `num_splits` if forced, else the heuristic on
    `max_context_len` (an upper bound; default: what the block table width can hold)."""
    if num_splits is None:
        block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
        bound = max_context_len if max_context_len is not None else block_tables.shape[1] * block_size
        num_splits = choose_num_splits(q.shape[0], num_kv_heads, bound, _num_sms(q.device))
    assert 1 <= num_splits <= MAX_SPLITS, num_splits
    return num_splits


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    scratch: AttentionScratch | None = None,
    num_splits: int | None = None,
    max_context_len: int | None = None,
) -> torch.Tensor:
    """Triton paged decode attention; same contract as the reference.

    q, out: [num_seqs, num_heads, head_dim]; k_cache, v_cache: [num_blocks, block_size,
    num_kv_heads, head_dim]; block_tables: int [num_seqs, max_blocks_per_seq];
    context_lens: int [num_seqs] (>= 1). Split count: see `plan_num_splits` (`num_splits`
    forces it; `max_context_len` sharpens the heuristic). `scratch` is read only when more
    than one split is used; if it is then missing, one is allocated for this call.
    Never synchronizes with the device.
    """
    if out is None:
        out = torch.empty_like(q)
    _check_args(q, k_cache, v_cache, block_tables, context_lens, out)
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    block_n = choose_block_n(head_dim)
    num_splits = plan_num_splits(q, k_cache, block_tables, num_splits, max_context_len)
    single = num_splits == 1
    if single:
        scratch = None
    else:
        if scratch is None:
            scratch = alloc_scratch(num_seqs, num_heads, head_dim, q.device, num_splits)
        assert scratch.fits(num_seqs, num_heads, head_dim) and scratch.max_splits >= num_splits
        assert scratch.partial_out.device == q.device
    po = scratch.partial_out if scratch is not None else out
    plse = scratch.partial_lse if scratch is not None else out
    d_pad = triton.next_power_of_2(head_dim)
    codec = kernel_codec(k_cache.dtype)
    k_scales = k_cache.view(torch.float16) if codec else k_cache  # fp16 views of the rows
    v_scales = v_cache.view(torch.float16) if codec else v_cache
    rotate = rotates(k_cache.dtype, head_dim)
    h_matrix = hadamard_matrix(head_dim, q.device) if rotate else q
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, k_scales, v_scales, h_matrix, block_tables, context_lens, out,
        po, plse,
        scale * _LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        po.stride(0), po.stride(1), po.stride(2) if not single else 0,
        plse.stride(0), plse.stride(1),
        num_splits,
        BLOCK_SIZE=block_size, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_N=block_n,
        SINGLE_SPLIT=single, DOT_FP32=_dot_in_fp32(q, k_cache), CODEC=codec, ROTATE=rotate,
    )
    if not single:
        _reduce_splits_kernel[(num_seqs, num_heads)](
            context_lens, out, po, plse,
            out.stride(0), out.stride(1),
            po.stride(0), po.stride(1), po.stride(2),
            plse.stride(0), plse.stride(1),
            num_splits,
            BLOCK_N=block_n, SPLITS_PAD=triton.next_power_of_2(num_splits),
            HEAD_DIM=head_dim, D_PAD=d_pad,
        )
    return out
