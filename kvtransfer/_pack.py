"""Gather/scatter one layer's blocks of a request to/from a contiguous transfer buffer.

    caches: [num_blocks, block_size, num_kv_heads, head_dim] (K and V, one layer)
    buffer: [2, n, block_size, num_kv_heads, head_dim]       (buffer[0] = K, buffer[1] = V)

Uses `kernels.reference.pack_kv / unpack_kv` when the `kernels` package is importable, and a
private index_select / index_copy_ fallback otherwise (same semantics), so kvtransfer never
depends on kernels being present.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_OPS: tuple[Callable[..., Any], Callable[..., Any]] | None = None


def _fallback_pack(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor, buffer: torch.Tensor
) -> torch.Tensor:
    torch.index_select(k_cache, 0, block_ids, out=buffer[0])
    torch.index_select(v_cache, 0, block_ids, out=buffer[1])
    return buffer


def _fallback_unpack(
    buffer: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor
) -> None:
    k_cache.index_copy_(0, block_ids, buffer[0])
    v_cache.index_copy_(0, block_ids, buffer[1])


def _ops() -> tuple[Callable[..., Any], Callable[..., Any]]:
    global _OPS
    if _OPS is None:
        try:
            from splitserve.kernels.reference import pack_kv, unpack_kv

            _OPS = (pack_kv, unpack_kv)
        except ImportError:
            _OPS = (_fallback_pack, _fallback_unpack)
    return _OPS


def pack_layer(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor, buffer: torch.Tensor
) -> torch.Tensor:
    """Gather blocks `block_ids` (int64 [n], on the caches' device) into `buffer`."""
    return _ops()[0](k_cache, v_cache, block_ids, buffer)


def unpack_layer(
    buffer: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor
) -> None:
    """Scatter `buffer` into blocks `block_ids` (distinct, int64 [n]) of the caches."""
    _ops()[1](buffer, k_cache, v_cache, block_ids)
