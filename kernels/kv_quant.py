"""The int8 KV cache format: one (token, kv head) row is `head_dim` int8 values followed by
its scale, an fp16 in 2 bytes, so a block stays one self-contained run of bytes (the KV
transfer, the host and disk tiers and live migration move quantized blocks and their scales
without knowing about them):

    k_cache, v_cache (int8): [num_blocks, block_size, num_kv_heads, head_dim + 2]
    value[d] = int8[d] * scale,  scale = max_d |x[d]| / 127 (rounded to fp16 first)

Per-token-per-head scales need no rescaling when a block fills up token by token (KIVI's
per-channel keys would). The C++ and Triton kernels read this layout in place; this module
is the torch reference of both directions.
"""

from __future__ import annotations

import torch

SCALE_BYTES = 2  # the fp16 scale after each row
QMAX = 127.0

__all__ = ["SCALE_BYTES", "dequantize_rows", "is_quantized", "quantize_rows", "row_width"]


def row_width(head_dim: int) -> int:
    """Bytes of one quantized (token, head) row."""
    return head_dim + SCALE_BYTES


def is_quantized(cache: torch.Tensor) -> bool:
    return cache.dtype == torch.int8


def quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., head_dim] floats -> int8 [..., head_dim + 2] (values, then the fp16 scale)."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / QMAX).to(torch.float16)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).float()
    values = torch.round(xf / safe).clamp_(-QMAX, QMAX).to(torch.int8)
    return torch.cat([values, scale.view(torch.int8)], dim=-1)


def dequantize_rows(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 [..., head_dim + 2] -> [..., head_dim] of `dtype` (values times the scale)."""
    head_dim = packed.shape[-1] - SCALE_BYTES
    scale = packed[..., head_dim:].contiguous().view(torch.float16).float()
    return (packed[..., :head_dim].float() * scale).to(dtype)
