"""The fused C++ CPU layer ops against the torch compositions they replace.

The references below are the torch code of engine/model.py (DecoderLayer.forward, RMSNorm,
apply_rope) written out here, so the kernels stay checked against plain torch even once the
model calls them. Rope + KV store must be bit-exact, and so must RMSNorm where torch sums in
the order the kernel copies (x86; elsewhere within 2 ulp). silu may differ by its exp: fp32
by a relative 1e-6, bf16/fp16 by at most one ulp, almost always zero.
"""

from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig

from splitserve.engine.model import ModelArch, RotaryEmbedding
from splitserve.kernels import cpu_ext, reference
from tests.kernels.conftest import assert_bits_equal, assert_close_ulps

pytestmark = pytest.mark.skipif(cpu_ext.load() is None, reason="CPU kernels could not be built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# torch's fp32 row sum uses 8-lane vectors on x86 (AVX2 and AVX512 builds); the kernel copies
# that order, so RMSNorm is bit-exact there.
EXACT_NORM = platform.machine().lower() in ("x86_64", "amd64")
# ---- rope + KV store ------------------------------------------------------------------


def rope_tables(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
                ) -> RotaryEmbedding:
    config = LlamaConfig(vocab_size=32, hidden_size=num_heads * head_dim, intermediate_size=8,
                         num_hidden_layers=1, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, head_dim=head_dim,
                         max_position_embeddings=4096)
    return RotaryEmbedding(ModelArch.from_hf_config(config), 4096, dtype)


def torch_rope_store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """DecoderLayer.forward's rope (cos, sin [T, 1, d]) + reference.store_kv; returns the
    rotated qkv [T, (H + 2 KVH) d]."""
    num_tokens = qkv.shape[0]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qk = qkv[:, : q_size + kv_size].view(num_tokens, num_heads + num_kv_heads, head_dim)
    half = head_dim // 2
    rotated = torch.cat((-qk[..., half:], qk[..., :half]), dim=-1)
    qk = qk * cos + rotated * sin
    k = qk[:, num_heads:]
    v = qkv[:, q_size + kv_size :].reshape(num_tokens, num_kv_heads, head_dim)
    reference.store_kv(k, v, k_cache, v_cache, slots)
    return torch.cat((qk.reshape(num_tokens, -1), v.reshape(num_tokens, -1)), dim=1)


def _rope_case(num_tokens: int, layout: tuple[int, int, int], block_size: int,
               dtype: torch.dtype, seed: int = 0):  # type: ignore[no-untyped-def]
    num_heads, num_kv_heads, head_dim = layout
    g = torch.Generator().manual_seed(seed)
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = (torch.randn(num_tokens, width, generator=g) * 3).to(dtype)
    rope = rope_tables(num_heads, num_kv_heads, head_dim, dtype)
    positions = torch.randint(0, 4096, (num_tokens,), generator=g)
    cos, sin = rope.tables(positions)  # [T, 1, d]
    num_blocks = num_tokens // block_size + 3
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = (torch.randn(shape, generator=g) * 100).to(dtype)
    v_cache = (torch.randn(shape, generator=g) * 100).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]  # shuffled
    slots[2::4] = -1  # padding tokens: never stored
    return qkv, cos, sin, k_cache, v_cache, slots


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", [(9, 3, 64), (4, 4, 32), (8, 2, 128), (6, 2, 80)])
@pytest.mark.parametrize("num_tokens", [1, 5, 64])
@pytest.mark.parametrize("block_size", [1, 16])
def test_rotary_store_kv_is_bit_exact(dtype: torch.dtype, layout: tuple[int, int, int],
                                      num_tokens: int, block_size: int) -> None:
    qkv, cos, sin, k_cache, v_cache, slots = _rope_case(num_tokens, layout, block_size, dtype)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    qkv_expected = torch_rope_store(qkv, cos, sin, k_expected, v_expected, slots, *layout)

    cpu_ext.rotary_store_kv_(qkv, cos, sin, k_cache, v_cache, slots, *layout)
    assert_bits_equal(qkv, qkv_expected)
    assert_bits_equal(k_cache, k_expected)  # also: slots never written kept their garbage
    assert_bits_equal(v_cache, v_expected)


@pytest.mark.parametrize(("dtype", "cache_dtype"), [
    (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
    (torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)])
@pytest.mark.parametrize("layout", [(9, 3, 64), (6, 2, 80)])
@pytest.mark.parametrize("num_tokens", [1, 64])
def test_rotary_store_kv_into_a_cache_of_another_float_type(
        dtype: torch.dtype, cache_dtype: torch.dtype, layout: tuple[int, int, int],
        num_tokens: int) -> None:
    qkv, cos, sin, k_cache, v_cache, slots = _rope_case(num_tokens, layout, 16, dtype, seed=3)
    k_cache, v_cache = k_cache.to(cache_dtype), v_cache.to(cache_dtype)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    # The reference store rounds the rotated K (of qkv's dtype) and V to the cache's type.
    qkv_expected = torch_rope_store(qkv, cos, sin, k_expected, v_expected, slots, *layout)

    cpu_ext.rotary_store_kv_(qkv, cos, sin, k_cache, v_cache, slots, *layout)
    assert_bits_equal(qkv, qkv_expected)
    assert_bits_equal(k_cache, k_expected)
    assert_bits_equal(v_cache, v_expected)


def test_rotary_store_kv_two_dim_tables_and_int32_slots() -> None:
    layout = (9, 3, 64)
    qkv, cos, sin, k_cache, v_cache, slots = _rope_case(7, layout, 16, torch.bfloat16, seed=1)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    qkv_expected = torch_rope_store(qkv, cos, sin, k_expected, v_expected, slots, *layout)
    cpu_ext.rotary_store_kv_(qkv, cos.squeeze(1), sin.squeeze(1), k_cache, v_cache,
                             slots.to(torch.int32), *layout)
    assert_bits_equal(qkv, qkv_expected)
    assert_bits_equal(k_cache, k_expected)
    assert_bits_equal(v_cache, v_expected)


def test_rotary_store_kv_single_padding_token_stores_nothing() -> None:
    layout = (4, 4, 32)
    qkv, cos, sin, k_cache, v_cache, _ = _rope_case(1, layout, 16, torch.float32, seed=2)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    qkv_expected = torch_rope_store(qkv, cos, sin, k_cache.clone(), v_cache.clone(),
                                    torch.tensor([-1]), *layout)
    cpu_ext.rotary_store_kv_(qkv, cos, sin, k_cache, v_cache, torch.tensor([-1]), *layout)
    assert_bits_equal(qkv, qkv_expected)
    assert_bits_equal(k_cache, k_before)
    assert_bits_equal(v_cache, v_before)


def test_rotary_store_kv_rejects_out_of_range_slot_before_writing() -> None:
    layout = (4, 4, 32)
    qkv, cos, sin, k_cache, v_cache, slots = _rope_case(3, layout, 1, torch.float32, seed=3)
    qkv_before, k_before = qkv.clone(), k_cache.clone()
    slots[2] = k_cache.shape[0] * k_cache.shape[1]
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_ext.rotary_store_kv_(qkv, cos, sin, k_cache, v_cache, slots, *layout)
    assert_bits_equal(qkv, qkv_before)
    assert_bits_equal(k_cache, k_before)


# ---- silu(gate) * up -----------------------------------------------------------------


def _gate_up(num_tokens: int, n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(num_tokens, 2 * n, generator=g) * 4
    edges = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 20.0, -20.0, 88.5, -88.5, 89.0, -89.0,
                          -104.0, 100.0, -1e4, 1e4])  # exp's clamps, over- and underflow
    gate_up[0, : edges.numel()] = edges
    return gate_up.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 5, 64])
@pytest.mark.parametrize("n", [1536, 100])
def test_silu_and_mul_matches_torch(dtype: torch.dtype, num_tokens: int, n: int) -> None:
    gate_up = _gate_up(num_tokens, n, dtype)
    expected = F.silu(gate_up[:, :n]) * gate_up[:, n:]
    got = cpu_ext.silu_and_mul(gate_up)
    assert_close_ulps(got, expected, equal_share=0.99)
    assert_bits_equal(got[0, :4], expected[0, :4])  # silu(+-0), silu(+-1e-30) exactly


def test_silu_and_mul_does_not_depend_on_the_column() -> None:
    """Vector body and scalar tail compute the same bits: permuting the columns of gate and
    up together permutes the output exactly (n = 23: one 16-lane vector and a tail with
    AVX-512, two 8-lane vectors and a tail with AVX2)."""
    gate_up = _gate_up(3, 23, torch.float32, seed=2)
    perm = torch.randperm(23, generator=torch.Generator().manual_seed(5))
    moved = torch.cat((gate_up[:, :23][:, perm], gate_up[:, 23:][:, perm]), dim=1)
    assert_bits_equal(cpu_ext.silu_and_mul(moved), cpu_ext.silu_and_mul(gate_up)[:, perm])


def test_silu_and_mul_into_strided_out() -> None:
    gate_up = _gate_up(6, 64, torch.bfloat16, seed=1)
    wide = torch.zeros(6, 80, dtype=torch.bfloat16)
    out = wide[:, 8:72]  # rows of a wider buffer
    cpu_ext.silu_and_mul(gate_up, out=out)
    assert_close_ulps(out, F.silu(gate_up[:, :64]) * gate_up[:, 64:], equal_share=0.99)
    assert bool((wide[:, :8] == 0).all() and (wide[:, 72:] == 0).all())


# ---- RMSNorm ---------------------------------------------------------------------------


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """engine.model.RMSNorm.forward."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return weight * F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype)


def assert_norm_matches(got: torch.Tensor, expected: torch.Tensor) -> None:
    if EXACT_NORM:
        assert_bits_equal(got, expected)
    else:  # one ulp in the normalized value, one more from the weight product
        assert_close_ulps(got, expected, equal_share=0.9, max_ulps=2)


def _norm_case(num_tokens: int, hidden: int, dtype: torch.dtype, seed: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(num_tokens, hidden, generator=g) * 2).to(dtype)
    residual = (torch.randn(num_tokens, hidden, generator=g) * 5).to(dtype)
    weight = (torch.rand(hidden, generator=g) + 0.5).to(dtype)
    return x, residual, weight


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 5, 64])
@pytest.mark.parametrize("hidden", [576, 100, 8200])  # torch's sum: 1 level, tails, 2 levels
def test_rms_norm_matches_model(dtype: torch.dtype, num_tokens: int, hidden: int) -> None:
    x, _, weight = _norm_case(num_tokens, hidden, dtype)
    got = cpu_ext.rms_norm(x, weight, 1e-5)
    assert_norm_matches(got, torch_rms_norm(x, weight, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 5, 64])
def test_add_rms_norm_matches_residual_add_then_norm(dtype: torch.dtype, num_tokens: int) -> None:
    x, residual, weight = _norm_case(num_tokens, 576, dtype, seed=1)
    h = residual + x  # the layer's `h = x + o_proj(...)`
    expected = torch_rms_norm(h, weight, 1e-6)
    cpu_ext.add_rms_norm_(x, residual, weight, 1e-6)
    assert_bits_equal(residual, h)
    assert_norm_matches(x, expected)


def test_rms_norm_strided_rows_and_in_place() -> None:
    x, _, weight = _norm_case(4, 64, torch.float32, seed=2)
    wide = torch.cat((x, torch.full((4, 8), 7.0)), dim=1)
    rows = wide[:, :64]  # row stride 72
    expected = torch_rms_norm(x, weight, 1e-5)
    cpu_ext.rms_norm(rows, weight, 1e-5, out=rows)
    assert_norm_matches(rows, expected)
    assert bool((wide[:, 64:] == 7.0).all())
