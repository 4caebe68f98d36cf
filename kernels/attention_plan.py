"""Launch planning for paged decode attention: split-K heuristics and scratch buffers.

Pure functions of shapes, and no triton import, so the engine can size and allocate the
scratch at start-up on any backend. Used by `kernels.paged_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "MAX_SPLITS",
    "AttentionScratch",
    "alloc_scratch",
    "choose_block_n",
    "choose_num_splits",
    "scratch_elements",
    "scratch_view",
]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# One long sequence over few kv heads needs many splits to occupy a large GPU: at 16 (the
# old cap) 1 x 32768 tokens over 8 kv heads ran 128 programs of 2048 tokens on 132 SMs and
# reached 40% of the copy bandwidth on an H200; 64 lets the two-programs-per-SM aim hold.
MAX_SPLITS = 64
_MIN_TOKENS_PER_SPLIT = 256
_PROGRAMS_PER_SM = 2


@dataclass(frozen=True)
class AttentionScratch:
    """Preallocated fp32 partials for split-K; allocate once with `alloc_scratch`.

    partial_out: [max_seqs, num_heads, max_splits, head_dim]
    partial_lse: [max_seqs, num_heads, max_splits]  (log-sum-exp in base 2)
    """

    partial_out: torch.Tensor
    partial_lse: torch.Tensor

    def __post_init__(self) -> None:
        o, lse = self.partial_out, self.partial_lse
        assert o.dim() == 4 and lse.shape == o.shape[:3], (o.shape, lse.shape)
        assert o.dtype == torch.float32 and lse.dtype == torch.float32
        assert o.is_contiguous() and lse.is_contiguous()

    @property
    def max_splits(self) -> int:
        return self.partial_out.shape[2]

    def fits(self, num_seqs: int, num_heads: int, head_dim: int) -> bool:
        o = self.partial_out
        return o.shape[0] >= num_seqs and o.shape[1] == num_heads and o.shape[3] == head_dim


def scratch_elements(num_seqs: int, num_heads: int, head_dim: int, num_splits: int
                     ) -> tuple[int, int]:
    """fp32 elements of (partial_out, partial_lse) for a call of this shape."""
    rows = num_seqs * num_heads * num_splits
    return rows * head_dim, rows


def scratch_view(flat_out: torch.Tensor, flat_lse: torch.Tensor, num_seqs: int,
                 num_heads: int, head_dim: int, num_splits: int) -> AttentionScratch:
    """An AttentionScratch of exactly this shape over the front of two flat fp32 buffers
    (at least `scratch_elements` long): one buffer serves calls of any shape, so its size is
    the largest seqs x splits product, not max seqs x max splits."""
    n_out, n_lse = scratch_elements(num_seqs, num_heads, head_dim, num_splits)
    return AttentionScratch(flat_out[:n_out].view(num_seqs, num_heads, num_splits, head_dim),
                            flat_lse[:n_lse].view(num_seqs, num_heads, num_splits))


def alloc_scratch(
    max_seqs: int,
    num_heads: int,
    head_dim: int,
    device: torch.device | str,
    max_splits: int = MAX_SPLITS,
) -> AttentionScratch:
    out = torch.empty(max_seqs, num_heads, max_splits, head_dim, dtype=torch.float32, device=device)
    lse = torch.empty(max_seqs, num_heads, max_splits, dtype=torch.float32, device=device)
    return AttentionScratch(out, lse)


def choose_num_splits(
    num_seqs: int, num_kv_heads: int, max_context_len: int, num_sms: int
) -> int:
    """Split the context only when (sequence, kv head) programs cannot fill the device:
    aim for about two programs per SM, never below _MIN_TOKENS_PER_SPLIT tokens a split."""
    programs = max(1, num_seqs * num_kv_heads)
    want = _cdiv(_PROGRAMS_PER_SM * max(1, num_sms), programs)
    by_length = _cdiv(max(1, max_context_len), _MIN_TOKENS_PER_SPLIT)
    return int(max(1, min(want, by_length, MAX_SPLITS)))


def choose_block_n(head_dim: int) -> int:
    """Tokens per inner-loop tile. Independent of block size (tokens are addressed one by
    one through the block table), so re-blocking the same KV gives bit-identical output."""
    return 64 if head_dim <= 128 else 32
