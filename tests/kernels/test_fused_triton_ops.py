"""The Triton fused layer ops (kernels.fused_ops) against the model's plain torch path.

On CPU they run in the Triton interpreter (tiny shapes: it is slow). Rope + KV store is
bit-exact in every dtype. RMSNorm sums its row as a tree, not in torch's order, so fp32 may
differ by a few ulp (measured up to 5 on hidden 96-8200: an ulp of the sum moves rsqrt by
up to 2, and x * r * w rounds twice more; checked as relative 1e-6); bf16/fp16 round the
norm before the weight and were bit-equal in every measured case (checked: within one ulp,
99.9% equal). silu uses Triton's exp (numpy's in the interpreter): fp32 within a relative
1e-6 (measured up to 4 ulp), half types within one ulp. The residual add of add_rms_norm_
is bit-exact.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from splitserve.engine.model import RMSNorm, apply_rope
from splitserve.kernels import fused_ops, kv_ops, reference
from splitserve.kernels.backend import get_attention_ops
from tests.kernels.conftest import (
    KERNEL_DEVICE,
    assert_bits_equal,
    assert_close_ulps,
)

# ---- rope + KV store ------------------------------------------------------------------


def rope_rows(num_tokens: int, head_dim: int, dtype: torch.dtype, g: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [num_tokens, 1, head_dim] at random positions (RotaryEmbedding's tables)."""
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    positions = torch.randint(0, 4096, (num_tokens,), generator=g).float()
    emb = (positions[:, None] * inv_freq[None, :]).repeat(1, 2)
    return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def torch_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
               num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DecoderLayer.forward's rope: (rotated qkv [T, width], k [T, KVH, d], v [T, KVH, d])."""
    num_tokens, rotated = qkv.shape[0], (num_heads + num_kv_heads) * head_dim
    qk = apply_rope(qkv[:, :rotated].view(num_tokens, -1, head_dim), cos, sin)
    v = qkv[:, rotated:].view(num_tokens, num_kv_heads, head_dim)
    out = torch.cat((qk.reshape(num_tokens, -1), qkv[:, rotated:]), dim=1)
    return out, qk[:, num_heads:], v


def rope_case(num_tokens: int, layout: tuple[int, int, int], block_size: int,
              dtype: torch.dtype, cache_dtype: torch.dtype | None = None, seed: int = 0
              ) -> tuple[torch.Tensor, ...]:
    """qkv, cos, sin, k_cache, v_cache (garbage-filled), shuffled slots with padding (-1)."""
    num_heads, num_kv_heads, head_dim = layout
    g = torch.Generator().manual_seed(seed)
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = (torch.randn(num_tokens, width, generator=g) * 3).to(dtype)
    cos, sin = rope_rows(num_tokens, head_dim, dtype, g)
    num_blocks = num_tokens // block_size + 2
    if cache_dtype is None:
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        k_cache = (torch.randn(shape, generator=g) * 100).to(dtype)
        v_cache = (torch.randn(shape, generator=g) * 100).to(dtype)
    else:
        shape = (num_blocks, block_size, num_kv_heads, head_dim + 2)
        k_cache = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).view(cache_dtype)
        v_cache = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).view(cache_dtype)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[1::3] = -1  # padding tokens: never stored
    return tuple(t.to(KERNEL_DEVICE) for t in (qkv, cos, sin, k_cache, v_cache, slots))


# (num_heads, num_kv_heads, head_dim): GQA 3, MHA, GQA 4 with head_dim 80 (half 40: padded).
LAYOUTS = [(6, 2, 64), (2, 2, 32), (4, 1, 80)]


def assert_rotary_store_matches_torch(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                                      k_cache: torch.Tensor, v_cache: torch.Tensor,
                                      slots: torch.Tensor, layout: tuple[int, int, int]) -> None:
    """The fused rope + store equals torch's rope then the reference store, bit for bit
    (slots never written keep their garbage)."""
    expected, k, v = torch_rope(qkv, cos, sin, *layout)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    reference.store_kv(k, v, k_expected, v_expected, slots)
    fused_ops.rotary_store_kv_(qkv, cos, sin, k_cache, v_cache, slots, *layout)
    assert_bits_equal(qkv, expected)
    assert_bits_equal(k_cache, k_expected)
    assert_bits_equal(v_cache, v_expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_rotary_store_kv_is_bit_exact(dtype: torch.dtype, layout: tuple[int, int, int]) -> None:
    qkv, cos, sin, k_cache, v_cache, slots = rope_case(5, layout, 2, dtype)
    assert_rotary_store_matches_torch(qkv, cos, sin, k_cache, v_cache, slots, layout)


@pytest.mark.parametrize(("dtype", "cache_dtype"), [(torch.float32, torch.bfloat16),
                                                    (torch.float32, torch.float16),
                                                    (torch.bfloat16, torch.float16)])
def test_rotary_store_kv_into_a_cache_of_another_float_type(dtype: torch.dtype,
                                                            cache_dtype: torch.dtype) -> None:
    qkv, cos, sin, k_cache, v_cache, slots = rope_case(5, (6, 2, 64), 2, dtype, seed=4)
    k_cache, v_cache = k_cache.to(cache_dtype), v_cache.to(cache_dtype)
    assert_rotary_store_matches_torch(qkv, cos, sin, k_cache, v_cache, slots, (6, 2, 64))


def test_rotary_store_kv_tokens_across_programs() -> None:
    """head_dim 128 puts 32 (token, head) rows in a program: 3 tokens of 12 + 2 * 10 heads
    take three, the second token split between two of them."""
    layout = (12, 10, 128)
    assert fused_ops.rotary_rows_per_program(128) == 32
    qkv, cos, sin, k_cache, v_cache, slots = rope_case(3, layout, 4, torch.bfloat16, seed=1)
    assert_rotary_store_matches_torch(qkv, cos, sin, k_cache, v_cache, slots, layout)


def test_rotary_store_kv_two_dim_tables_int32_slots_and_all_padding() -> None:
    layout = (6, 2, 64)
    qkv, cos, sin, k_cache, v_cache, slots = rope_case(4, layout, 2, torch.float32, seed=2)
    expected, _, _ = torch_rope(qkv, cos, sin, *layout)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    padding = torch.full_like(slots, -1, dtype=torch.int32)
    fused_ops.rotary_store_kv_(qkv, cos.squeeze(1), sin.squeeze(1), k_cache, v_cache, padding,
                               *layout)
    assert_bits_equal(qkv, expected)
    assert_bits_equal(k_cache, k_before)
    assert_bits_equal(v_cache, v_before)


@pytest.mark.parametrize("cache_dtype", [torch.int8, torch.uint8], ids=["int8", "fp8"])
@pytest.mark.parametrize("layout", [(6, 2, 64), (4, 1, 80)])  # rotated rows; not rotated
def test_rotary_store_kv_quantized_is_rope_then_store_kv(cache_dtype: torch.dtype,
                                                         layout: tuple[int, int, int]) -> None:
    qkv, cos, sin, k_cache, v_cache, slots = rope_case(4, layout, 2, torch.bfloat16,
                                                       cache_dtype, seed=3)
    expected, k, v = torch_rope(qkv, cos, sin, *layout)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    kv_ops.store_kv(k, v, k_expected, v_expected, slots)
    assert not torch.equal(k_expected, k_cache)  # the store writes something

    fused_ops.rotary_store_kv_(qkv, cos, sin, k_cache, v_cache, slots, *layout)
    assert_bits_equal(qkv, expected)
    assert_bits_equal(k_cache, k_expected)
    assert_bits_equal(v_cache, v_expected)


# ---- silu(gate) * up -----------------------------------------------------------------


def gate_up_case(num_tokens: int, n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(num_tokens, 2 * n, generator=g) * 4
    edges = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 20.0, -20.0, 88.5, -88.5, 89.0, -89.0,
                          -104.0, 100.0, -1e4, 1e4])  # exp's over- and underflow
    gate_up[0, : edges.numel()] = edges
    return gate_up.to(dtype=dtype, device=KERNEL_DEVICE)


# The interpreter computes exp with numpy, which warns where it overflows to inf (as it should).
EXP_OVERFLOW = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


@EXP_OVERFLOW
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [48, 1100])  # one tile; two column blocks, the second partial
def test_silu_and_mul_matches_torch(dtype: torch.dtype, n: int) -> None:
    gate_up = gate_up_case(3, n, dtype)
    gate, up = gate_up.split(n, dim=-1)
    expected = F.silu(gate) * up
    got = fused_ops.silu_and_mul(gate_up)
    assert_close_ulps(got, expected, equal_share=0.99)
    assert_bits_equal(got[0, :4], expected[0, :4])  # silu(+-0), silu(+-1e-30) exactly


@EXP_OVERFLOW
def test_silu_and_mul_into_strided_out() -> None:
    gate_up = gate_up_case(3, 40, torch.bfloat16, seed=1)
    wide = torch.zeros(3, 56, dtype=torch.bfloat16, device=KERNEL_DEVICE)
    out = wide[:, 8:48]
    assert fused_ops.silu_and_mul(gate_up, out=out) is out
    assert_close_ulps(out, F.silu(gate_up[:, :40]) * gate_up[:, 40:], equal_share=0.99)
    assert bool((wide[:, :8] == 0).all() and (wide[:, 48:] == 0).all())


# ---- RMSNorm ---------------------------------------------------------------------------


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    norm = RMSNorm(weight.shape[0], eps).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
        return norm(x)


def norm_case(num_tokens: int, hidden: int, dtype: torch.dtype, seed: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g) * 2
    residual = torch.randn(num_tokens, hidden, generator=g) * 5
    weight = torch.rand(hidden, generator=g) + 0.5
    return tuple(t.to(dtype=dtype, device=KERNEL_DEVICE) for t in (x, residual, weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [96, 576, 8200])
def test_rms_norm_matches_model(dtype: torch.dtype, hidden: int) -> None:
    x, _, weight = norm_case(3, hidden, dtype)
    got = fused_ops.rms_norm(x, weight, 1e-5)
    assert_close_ulps(got, torch_rms_norm(x, weight, 1e-5), equal_share=0.999)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [96, 576])
def test_add_rms_norm_matches_residual_add_then_norm(dtype: torch.dtype, hidden: int) -> None:
    x, residual, weight = norm_case(5, hidden, dtype, seed=1)
    h = residual + x  # the layer's `h = x + o_proj(...)`
    expected = torch_rms_norm(h, weight, 1e-6)
    fused_ops.add_rms_norm_(x, residual, weight, 1e-6)
    assert_bits_equal(residual, h)
    assert_close_ulps(x, expected, equal_share=0.999)


def test_rms_norm_strided_rows_in_place() -> None:
    x, _, weight = norm_case(4, 96, torch.bfloat16, seed=2)
    wide = torch.cat((x, torch.full((4, 8), 7.0, dtype=x.dtype, device=x.device)), dim=1)
    rows = wide[:, :96]  # row stride 104
    expected = torch_rms_norm(x, weight, 1e-5)
    assert fused_ops.rms_norm(rows, weight, 1e-5, out=rows) is rows
    assert_close_ulps(rows, expected, equal_share=0.999)
    assert bool((wide[:, 96:] == 7.0).all())


# ---- the backend and the engine ------------------------------------------------------


def test_triton_backend_has_these_fused_ops() -> None:
    fused = get_attention_ops("triton", KERNEL_DEVICE).fused
    assert fused is not None
    assert fused.rotary_store_kv_ is fused_ops.rotary_store_kv_
    assert fused.add_rms_norm_ is fused_ops.add_rms_norm_


def test_engine_greedy_tokens_match_torch_backend(tiny_llama: Path) -> None:
    """The tiny fp32 model on the triton backend (fused layer path) decodes the torch
    backend's greedy tokens, with the same logprobs to 1e-4."""
    from splitserve.common.sampling_params import SamplingParams
    from splitserve.llm import LLM

    # 11 tokens in chunks of 8: the second chunk reads the first one's KV from the cache.
    prompts = [[7, 8, 9], list(range(500, 511))]
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=1, ignore_eos=True)
    config = {"num_kv_blocks": 16, "block_size": 4, "max_num_batched_tokens": 8}
    fused = LLM(model=str(tiny_llama), attention_backend="triton", **config)
    assert fused.engine.runner.ops.fused is not None
    plain = LLM(model=str(tiny_llama), attention_backend="torch", **config)
    for a, b in zip(fused.generate(prompts, params), plain.generate(prompts, params),
                    strict=True):
        assert a.token_ids == b.token_ids
        for got, want in zip(a.logprobs, b.logprobs, strict=True):
            assert abs(got.logprob - want.logprob) <= 1e-4


# ---- on a GPU --------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_ops_match_torch_on_cuda(dtype: torch.dtype) -> None:
    """Llama-8B-sized rows on CUDA against torch on CUDA (its rsqrt and exp are not
    IEEE-exact, so norm and silu are checked within an ulp)."""
    layout = (32, 8, 128)
    qkv, cos, sin, k_cache, v_cache, slots = rope_case(7, layout, 16, dtype, seed=4)
    assert_rotary_store_matches_torch(qkv, cos, sin, k_cache, v_cache, slots, layout)

    gate_up = gate_up_case(7, 14336, dtype, seed=5)
    gate, up = gate_up.split(14336, dim=-1)
    check = assert_close_cuda if dtype == torch.float32 else assert_close_ulps
    check(fused_ops.silu_and_mul(gate_up), F.silu(gate) * up, equal_share=0.99)
    for hidden in (4096, 8192):
        x, residual, weight = norm_case(7, hidden, dtype, seed=6)
        check(fused_ops.rms_norm(x, weight, 1e-5), torch_rms_norm(x, weight, 1e-5),
              equal_share=0.99)
        h = residual + x
        fused_ops.add_rms_norm_(x, residual, weight, 1e-5)
        assert_bits_equal(residual, h)
        check(x, torch_rms_norm(h, weight, 1e-5), equal_share=0.99)


def assert_close_cuda(got: torch.Tensor, expected: torch.Tensor, equal_share: float) -> None:
    """fp32 against torch on CUDA (approximate rsqrt/exp there): relative 4e-6."""
    del equal_share
    torch.testing.assert_close(got, expected, rtol=4e-6, atol=1e-30)


@pytest.mark.gpu
def test_cuda_graph_capture_replays_the_ops() -> None:
    """No host sync or allocation inside: the four ops capture into a CUDA graph whose
    replay on new inputs gives what running them eagerly on those inputs gives."""
    layout, dtype = (8, 2, 64), torch.bfloat16

    def case(seed: int) -> list[torch.Tensor]:
        return [*rope_case(6, layout, 4, dtype, seed=seed), *norm_case(6, 512, dtype, seed),
                gate_up_case(6, 256, dtype, seed)]

    inputs = case(7)  # the graph's buffers
    qkv, cos, sin, k_cache, v_cache, slots, x, residual, weight, gate_up = inputs
    normed, act = torch.empty_like(x), gate_up.new_empty(6, 256)
    outputs = (qkv, k_cache, v_cache, x, residual, normed, act)

    def step() -> None:
        fused_ops.rotary_store_kv_(qkv, cos, sin, k_cache, v_cache, slots, *layout)
        fused_ops.rms_norm(residual, weight, 1e-5, out=normed)
        fused_ops.add_rms_norm_(x, residual, weight, 1e-5)
        fused_ops.silu_and_mul(gate_up, out=act)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    fresh = case(8)
    for buffer, value in zip(inputs, fresh, strict=True):
        buffer.copy_(value)
    graph.replay()
    replayed = [t.clone() for t in outputs]
    for buffer, value in zip(inputs, fresh, strict=True):
        buffer.copy_(value)
    step()
    for got, want in zip(replayed, outputs, strict=True):
        assert_bits_equal(got, want)
