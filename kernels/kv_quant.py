"""The int8 KV cache format: one (token, kv head) row is `head_dim` int8 values followed by
its scale, an fp16 in 2 bytes, so a block stays one self-contained run of bytes (the KV
transfer, the host and disk tiers and live migration move quantized blocks and their scales
without knowing about them):

    k_cache, v_cache (int8): [num_blocks, block_size, num_kv_heads, head_dim + 2]
    y = H x (head_dim a power of two; else y = x)
    y[d] ~ int8[d] * scale,  scale = max_d |y[d]| / 127 (rounded to fp16 first)

H is the orthonormal Walsh-Hadamard matrix (symmetric, H H = I; QuaRot's trick): keys have a
few channels far larger than the rest, which would set a per-row scale too coarse for the
others; rotated, every channel carries a share of them. Attention is unchanged by it, since
(H q).(H k) = q.k and sum_i p_i H v_i = H (sum_i p_i v_i): the decode kernels rotate the
query in and the output back, and never rotate a cached row. Measured on SmolLM2 (see
BENCHMARKS.md): greedy outputs identical for 32 tokens rose from 22 to 28 of 32 prompts.
Per-token-per-head scales need no rescaling when a block fills up token by token (KIVI's
per-channel keys would). The C++ and Triton kernels read this layout in place; this module
is the torch reference of both directions.
"""

from __future__ import annotations

import functools
import math

import torch

SCALE_BYTES = 2  # the fp16 scale after each row
# Bumped whenever the bytes of a quantized row change meaning (KV kept on disk, e.g. the
# disk tier's files, must not outlive it): 2 = rotated rows.
FORMAT_VERSION = 2
QMAX = 127.0

__all__ = ["SCALE_BYTES", "dequantize_rows", "hadamard", "hadamard_matrix", "is_quantized",
           "quantize_rows", "rotates", "row_width"]


def rotates(head_dim: int) -> bool:
    """Whether rows of this width are stored rotated (a power of two)."""
    return head_dim >= 2 and head_dim & (head_dim - 1) == 0


@functools.lru_cache(maxsize=16)
def hadamard_matrix(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """H as an fp32 [n, n] matrix (for kernels that rotate with a matrix product); built
    once per (n, device), never written."""
    return hadamard(torch.eye(n, device=device))


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """H x along the last dim (a power of two), fp32, by butterflies in the order the C++
    kernels use (csrc/kv_quant.h), so both round alike. H is its own inverse."""
    n = x.shape[-1]
    y = x.float()
    h = 1
    while h < n:
        pairs = y.reshape(*x.shape[:-1], n // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).reshape(x.shape)
        h *= 2
    return y * (1.0 / math.sqrt(n))


def row_width(head_dim: int) -> int:
    """Bytes of one quantized (token, head) row."""
    return head_dim + SCALE_BYTES


def is_quantized(cache: torch.Tensor) -> bool:
    return cache.dtype == torch.int8


def quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., head_dim] floats -> int8 [..., head_dim + 2] (values, then the fp16 scale)."""
    xf = hadamard(x) if rotates(x.shape[-1]) else x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / QMAX).to(torch.float16)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).float()
    values = torch.round(xf / safe).clamp_(-QMAX, QMAX).to(torch.int8)
    return torch.cat([values, scale.view(torch.int8)], dim=-1)


def dequantize_rows(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 [..., head_dim + 2] -> [..., head_dim] of `dtype` (values times the scale,
    rotated back)."""
    head_dim = packed.shape[-1] - SCALE_BYTES
    scale = packed[..., head_dim:].contiguous().view(torch.float16).float()
    values = packed[..., :head_dim].float() * scale
    return (hadamard(values) if rotates(head_dim) else values).to(dtype)
