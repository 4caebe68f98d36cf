"""Kernel test setup: Triton runs under its CPU interpreter unless CUDA is present.

TRITON_INTERPRET is read when @triton.jit decorates a kernel, so it is set here, before
any test module imports kernels.paged_attention / kernels.kv_ops.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Triton kernels run on the GPU when there is one, else on CPU tensors in the interpreter.
KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class PagedKV:
    """A batch of sequences' K/V, both dense (ground truth) and scattered into a cache."""

    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq], padded with -1
    context_lens: torch.Tensor  # int32 [num_seqs]
    dense_k: list[torch.Tensor]  # per sequence [context_len, num_kv_heads, head_dim]
    dense_v: list[torch.Tensor]


def build_paged_kv(
    dense_k: Sequence[torch.Tensor],
    dense_v: Sequence[torch.Tensor],
    block_size: int,
    generator: torch.Generator,
    spare_blocks: int = 3,
    pad_columns: int = 1,
) -> PagedKV:
    """Scatter per-sequence K/V into randomly chosen, shuffled blocks of a cache whose
    other slots hold large garbage (so a misread shows up), with -1 padded block tables."""
    lens = [k.shape[0] for k in dense_k]
    _, num_kv_heads, head_dim = dense_k[0].shape
    dtype, device = dense_k[0].dtype, dense_k[0].device
    per_seq = [(n + block_size - 1) // block_size for n in lens]
    num_blocks = sum(per_seq) + spare_blocks
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = (torch.randn(shape, generator=generator) * 100).to(dtype=dtype, device=device)
    v_cache = (torch.randn(shape, generator=generator) * 100).to(dtype=dtype, device=device)
    order = torch.randperm(num_blocks, generator=generator).tolist()
    table = torch.full((len(lens), max(per_seq) + pad_columns), -1, dtype=torch.int32)
    flat_k = k_cache.view(-1, num_kv_heads, head_dim)
    flat_v = v_cache.view(-1, num_kv_heads, head_dim)
    for s, (k, v) in enumerate(zip(dense_k, dense_v, strict=True)):
        ids, order = order[: per_seq[s]], order[per_seq[s] :]
        table[s, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        t = torch.arange(k.shape[0])
        slots = torch.tensor(ids)[t // block_size] * block_size + t % block_size
        flat_k[slots.to(device)] = k
        flat_v[slots.to(device)] = v
    return PagedKV(
        k_cache, v_cache, table.to(device), torch.tensor(lens, dtype=torch.int32, device=device),
        list(dense_k), list(dense_v),
    )


def random_dense_kv(
    lens: Sequence[int],
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    ks = [torch.randn(n, num_kv_heads, head_dim, generator=generator).to(dtype=dtype, device=device)
          for n in lens]
    vs = [torch.randn(n, num_kv_heads, head_dim, generator=generator).to(dtype=dtype, device=device)
          for n in lens]
    return ks, vs


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def rebuild(gen: torch.Generator) -> Callable[..., PagedKV]:
    """rebuild(dense_k, dense_v, block_size) -> PagedKV with fresh random block ids."""

    def build(dense_k: Sequence[torch.Tensor], dense_v: Sequence[torch.Tensor], block_size: int) -> PagedKV:
        return build_paged_kv(dense_k, dense_v, block_size, gen)

    return build


@pytest.fixture
def make_batch(gen: torch.Generator) -> Callable[..., tuple[torch.Tensor, PagedKV]]:
    """make_batch(lens, num_heads, num_kv_heads, head_dim, block_size, dtype, device)
    -> (q [num_seqs, num_heads, head_dim], PagedKV)."""

    def make(
        lens: Sequence[int],
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device = KERNEL_DEVICE,
    ) -> tuple[torch.Tensor, PagedKV]:
        ks, vs = random_dense_kv(lens, num_kv_heads, head_dim, dtype, device, gen)
        kv = build_paged_kv(ks, vs, block_size, gen)
        q = torch.randn(len(lens), num_heads, head_dim, generator=gen).to(dtype=dtype, device=device)
        return q, kv

    return make


# ---- bit-level comparisons (the fused-op tests of both backends) ------------------------

_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise count of representable values between a and b (same dtype; -0 == +0)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    bits = torch.finfo(a.dtype).bits

    def ordered(t: torch.Tensor) -> torch.Tensor:  # sign-magnitude -> a monotonic integer
        i = t.contiguous().view(_INT_VIEW[t.dtype]).to(torch.int64)
        return torch.where(i < 0, -(i + (1 << (bits - 1))), i)

    return (ordered(a) - ordered(b)).abs()


def assert_bits_equal(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape
    mismatch = got.contiguous().view(torch.uint8) != expected.contiguous().view(torch.uint8)
    assert not bool(mismatch.any()), f"{int(mismatch.sum())} bytes differ in their bits"


def assert_close_ulps(got: torch.Tensor, expected: torch.Tensor, equal_share: float,
                      max_ulps: int = 1) -> None:
    """fp32: relative 1e-6; half types: at most `max_ulps` apart, `equal_share` bit-equal."""
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-30)
        return
    distance = ulp_distance(got, expected)
    assert int(distance.max()) <= max_ulps, f"max ulp distance {int(distance.max())}"
    share = float((distance == 0).float().mean())
    assert share >= equal_share, f"only {share:.4f} of the elements are bit-equal"
