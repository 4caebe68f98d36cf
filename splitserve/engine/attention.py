"""Attention over the paged KV cache: the one dispatch point for attention kernels.

A step's tokens are laid out decode-first: the first `num_decode_tokens` rows are sequences
computing exactly one token (decodes, or a prompt's last single-token chunk) and go through
the paged decode kernel in one batch; then each prompt chunk ("prefill span") attends over
its cached prefix plus its own tokens, causally.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from splitserve.kernels.kv_quant import dequantize_rows, is_quantized


@dataclass(slots=True)
class PrefillSpan:
    start: int  # first row of this chunk in the step's token dimension
    num_tokens: int  # tokens computed in this chunk
    context_len: int  # tokens with KV after this chunk (cached prefix + chunk)
    block_ids: torch.Tensor  # int64 [ceil(context_len / block_size)], on the cache's device


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # int64 [num_tokens]; block_id * block_size + offset
    num_decode_tokens: int
    decode_block_tables: torch.Tensor  # int32 [num_decode_tokens, max_blocks_per_seq]
    decode_context_lens: torch.Tensor  # int32 [num_decode_tokens]
    prefills: list[PrefillSpan] = field(default_factory=list)
    # Backend-specific per-step precomputation shared by all layers (kernels.reference's
    # DecodePlan for the torch backend), or None.
    decode_plan: Any = None
    # Extra keywords for the decode kernel, fixed for a captured CUDA graph (the Triton
    # kernel's scratch, num_splits and max_context_len: engine/cuda_graphs.py), or None.
    decode_launch: dict[str, Any] | None = None


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    ops: Any,
) -> torch.Tensor:
    """Store this step's K/V, then attend.

    q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim];
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim].
    Returns [num_tokens, num_heads, head_dim].
    """
    ops.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    return attend_stored(q, k, v, k_cache, v_cache, meta, scale, ops)


def attend_stored(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    ops: Any,
) -> torch.Tensor:
    """paged_attention for a step whose K/V are already in the cache (same shapes)."""
    out = torch.empty_like(q)
    num_decode = meta.num_decode_tokens
    if num_decode:
        extra = {"plan": meta.decode_plan} if meta.decode_plan is not None else {}
        if meta.decode_launch is not None:
            extra.update(meta.decode_launch)
        ops.paged_decode_attention(
            q[:num_decode],
            k_cache,
            v_cache,
            meta.decode_block_tables,
            meta.decode_context_lens,
            scale,
            out=out[:num_decode],
            **extra,
        )
    for span in meta.prefills:
        rows = slice(span.start, span.start + span.num_tokens)
        if span.context_len == span.num_tokens:
            keys, values = k[rows], v[rows]  # no cached prefix: use the fresh K/V directly
        else:
            keys = _gather_blocks(k_cache, span.block_ids, span.context_len, q.dtype)
            values = _gather_blocks(v_cache, span.block_ids, span.context_len, q.dtype)
        out[rows] = _causal_attention(q[rows], keys, values, scale)
    return out


def _gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor, length: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """[num_blocks, block_size, kv_heads, d] -> the first `length` slots of the given blocks
    as `dtype` (a quantized cache: dequantized, only those slots)."""
    blocks = cache.index_select(0, block_ids)
    rows = blocks.reshape(-1, cache.shape[2], cache.shape[3])[:length]
    return dequantize_rows(rows, dtype) if is_quantized(cache) else rows.to(dtype)


def _causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """q: [n, heads, d]; k, v: [ctx, kv_heads, d] where the n queries are the last n of ctx."""
    num_queries, context_len = q.shape[0], k.shape[0]
    qt = q.transpose(0, 1).unsqueeze(0)  # [1, heads, n, d]
    kt = k.transpose(0, 1).unsqueeze(0)  # [1, kv_heads, ctx, d]
    vt = v.transpose(0, 1).unsqueeze(0)
    gqa = q.shape[1] != k.shape[1]
    if num_queries == context_len:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        offset = context_len - num_queries
        rows = torch.arange(num_queries, device=q.device).unsqueeze(1)
        cols = torch.arange(context_len, device=q.device).unsqueeze(0)
        mask = cols <= rows + offset  # [n, ctx], True = attend
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.squeeze(0).transpose(0, 1)
