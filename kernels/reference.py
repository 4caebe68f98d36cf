"""Plain-torch references for the kernels package (CPU or GPU, no triton).

These are the ground truth the Triton kernels are tested against, and the attention
backend the engine uses on CPU. Layouts (one layer of the KV cache):

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    slot mapping:     slot = block_id * block_size + offset  (negative = padding, skipped)
    transfer buffer:  [2, n, block_size, num_kv_heads, head_dim]  (buffer[0] = K, buffer[1] = V)

GQA: query head h reads kv head h // (num_heads // num_kv_heads). An int8 or fp8 cache
holds quantized rows of head_dim + 2 bytes (kernels.kv_quant): the store quantizes, attention
dequantizes what it reads; pack/unpack move the bytes as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from splitserve.kernels.kv_quant import (
    codec_of,
    dequantize_rows,
    is_quantized,
    quantize_rows,
    row_width,
)

__all__ = ["DecodePlan", "plan_decode", "paged_decode_attention", "store_kv", "pack_kv",
           "unpack_kv"]


@dataclass(frozen=True, slots=True)
class DecodePlan:
    """What every layer of one decode step shares: which blocks to gather and which slots
    are real. Built once per step (plan_decode) so the layers skip the bookkeeping."""

    gather_index: torch.Tensor  # int64 [num_seqs * num_blocks_used], valid block ids
    valid: torch.Tensor  # bool [num_seqs, 1, 1, num_blocks_used * block_size]
    num_seqs: int
    num_blocks_used: int


def plan_decode(
    block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int, num_blocks: int
) -> DecodePlan:
    """block_tables: int [num_seqs, max_blocks_per_seq]; context_lens: int [num_seqs]."""
    lens = context_lens.to(dtype=torch.long)
    max_len = int(lens.max().item())
    num_blocks_used = (max_len + block_size - 1) // block_size
    assert num_blocks_used <= block_tables.shape[1], "context longer than the block table"
    table = block_tables[:, :num_blocks_used].to(dtype=torch.long).clamp(0, num_blocks - 1)
    positions = torch.arange(num_blocks_used * block_size, device=lens.device)
    valid = (positions[None, :] < lens[:, None])[:, None, None, :]
    return DecodePlan(table.reshape(-1), valid, int(block_tables.shape[0]), num_blocks_used)


def _check_cache_pair(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    assert k_cache.dim() == 4, f"cache must be [num_blocks, block_size, kv_heads, d], got {k_cache.shape}"
    assert k_cache.shape == v_cache.shape, (k_cache.shape, v_cache.shape)
    assert k_cache.dtype == v_cache.dtype, (k_cache.dtype, v_cache.dtype)


def gather_kv(
    cache: torch.Tensor, block_tables: torch.Tensor, num_blocks_used: int
) -> torch.Tensor:
    """Dense copy of the first `num_blocks_used` blocks of every block table.

    cache: [num_blocks, block_size, num_kv_heads, head_dim]; block_tables: [num_seqs, >= n].
    Returns [num_seqs, num_blocks_used * block_size, num_kv_heads, head_dim]. Entries of a
    block table past a sequence's own blocks may hold anything (e.g. -1): they are clamped
    to a valid block id here and must be masked by the caller.
    """
    table = block_tables[:, :num_blocks_used].to(device=cache.device, dtype=torch.long)
    index = table.clamp(0, cache.shape[0] - 1).reshape(-1)
    return _gather(cache, index, block_tables.shape[0], num_blocks_used)


def _gather(cache: torch.Tensor, index: torch.Tensor, num_seqs: int, num_blocks_used: int
            ) -> torch.Tensor:
    _, block_size, num_kv_heads, head_dim = cache.shape
    gathered = cache.index_select(0, index)  # [num_seqs * n, block_size, kv_heads, d]
    return gathered.view(num_seqs, num_blocks_used * block_size, num_kv_heads, head_dim)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    plan: DecodePlan | None = None,
) -> torch.Tensor:
    """One query token per sequence attending over its paged context.

    q: [num_seqs, num_heads, head_dim]; block_tables: int [num_seqs, max_blocks_per_seq];
    context_lens: int [num_seqs], each >= 1. Scores and softmax in fp32; returns
    [num_seqs, num_heads, head_dim] in q.dtype (written into `out` when given).
    """
    _check_cache_pair(k_cache, v_cache)
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    quantized = is_quantized(k_cache)
    assert cache_head_dim == (row_width(head_dim) if quantized else head_dim), (
        cache_head_dim, head_dim)
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert block_tables.shape[0] == num_seqs and context_lens.shape == (num_seqs,)
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape, (out.shape, q.shape)
    if num_seqs == 0:
        return out

    if plan is None:
        plan = plan_decode(block_tables.to(q.device), context_lens.to(q.device), block_size,
                           k_cache.shape[0])
    # [num_seqs, kv_heads, T, d], T = num_blocks_used * block_size (a strided view)
    k = _gather(k_cache, plan.gather_index, num_seqs, plan.num_blocks_used)
    v = _gather(v_cache, plan.gather_index, num_seqs, plan.num_blocks_used)
    if quantized:  # only the gathered blocks are dequantized
        k, v = dequantize_rows(k, q.dtype), dequantize_rows(v, q.dtype)
    else:  # a bf16 / fp16 cache under a wider q: its values, exactly, in q's dtype
        k, v = k.to(q.dtype), v.to(q.dtype)
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    # SDPA accumulates in fp32 for half types and shares each kv head among its group of
    # query heads (enable_gqa); on CPU it is ~2x faster than explicit bmm + softmax.
    result = F.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, attn_mask=plan.valid, scale=scale, enable_gqa=group > 1
    )  # [num_seqs, num_heads, 1, d]
    out.copy_(result.squeeze(2))
    return out


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write new tokens' K/V into their slots, in place.

    k, v: [num_tokens, num_kv_heads, head_dim]; slot_mapping: int [num_tokens]
    (block_id * block_size + offset; negative = skip). The caches may be strided views.
    """
    _check_cache_pair(k_cache, v_cache)
    assert k.shape == v.shape and k.dim() == 3, (k.shape, v.shape)
    codec = codec_of(k_cache.dtype)
    if codec is not None:
        k, v = quantize_rows(k, codec), quantize_rows(v, codec)
    assert k.shape[1:] == k_cache.shape[2:], (k.shape, k_cache.shape)
    assert slot_mapping.shape == (k.shape[0],), (slot_mapping.shape, k.shape)
    slots = slot_mapping.to(device=k_cache.device, dtype=torch.long)
    keep = slots >= 0
    if not bool(keep.all()):
        slots, k, v = slots[keep], k[keep], v[keep]
    if k_cache.is_contiguous() and v_cache.is_contiguous():
        # One flat index_copy_ per cache: [num_blocks * block_size, kv_heads, d] rows.
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k.to(k_cache.dtype))
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v.to(v_cache.dtype))
        return
    block_size = k_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = k.to(k_cache.dtype)
    v_cache[blocks, offsets] = v.to(v_cache.dtype)


def _check_buffer(buffer: torch.Tensor, k_cache: torch.Tensor, n: int) -> None:
    expected = (2, n, *k_cache.shape[1:])
    assert tuple(buffer.shape) == expected, (tuple(buffer.shape), expected)
    assert buffer.dtype == k_cache.dtype, (buffer.dtype, k_cache.dtype)
    assert buffer.is_contiguous(), "transfer buffer must be contiguous"


def pack_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_ids: torch.Tensor,
    buffer: torch.Tensor,
) -> torch.Tensor:
    """Gather blocks `block_ids` ([n]) of one layer into `buffer`
    [2, n, block_size, num_kv_heads, head_dim] (buffer[0] = K, buffer[1] = V); returns it."""
    _check_cache_pair(k_cache, v_cache)
    assert block_ids.dim() == 1, block_ids.shape
    _check_buffer(buffer, k_cache, block_ids.shape[0])
    ids = block_ids.to(device=k_cache.device, dtype=torch.long)
    buffer[0].copy_(k_cache.index_select(0, ids))
    buffer[1].copy_(v_cache.index_select(0, ids))
    return buffer


def unpack_kv(
    buffer: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_ids: torch.Tensor,
) -> None:
    """Scatter `buffer` [2, n, block_size, num_kv_heads, head_dim] into blocks `block_ids`
    ([n], distinct) of the caches, in place."""
    _check_cache_pair(k_cache, v_cache)
    assert block_ids.dim() == 1, block_ids.shape
    _check_buffer(buffer, k_cache, block_ids.shape[0])
    ids = block_ids.to(device=k_cache.device, dtype=torch.long)
    k_cache.index_copy_(0, ids, buffer[0])
    v_cache.index_copy_(0, ids, buffer[1])
