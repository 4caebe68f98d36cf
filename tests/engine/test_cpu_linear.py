"""Prepacked CPU linear layers: same outputs as nn.Linear at every row count, tied weights kept."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from splitserve.common.sampling_params import SamplingParams
from splitserve.engine.cpu_linear import (
    PackedLinear,
    _onednn_bf16,
    packed_rows,
    packing_for,
    prepack_linears,
    prepack_supported,
)
from splitserve.kernels import cpu_ext
from splitserve.llm import LLM

pytestmark = pytest.mark.skipif(
    not prepack_supported(torch.float32, torch.device("cpu")), reason="no oneDNN in this torch"
)
_PACKINGS = [
    pytest.param("panel", torch.float32, 1e-5, marks=pytest.mark.skipif(
        not cpu_ext.gemm_supported(), reason="the panel GEMM needs AVX-512 or AVX2")),
    pytest.param("onednn_fp32", torch.float32, 1e-5),
    pytest.param("onednn_bf16", torch.bfloat16, 1e-2, marks=pytest.mark.skipif(
        not _onednn_bf16(), reason="this CPU's oneDNN has no bf16 path")),
    pytest.param("panel_bf16", torch.bfloat16, 1e-2, marks=pytest.mark.skipif(
        not cpu_ext.gemm_bf16_supported(), reason="the bf16 panels need AVX512-BF16 or AVX2")),
]


@pytest.mark.parametrize(("packing", "dtype", "tolerance"), _PACKINGS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("in_features", "out_features"), [(96, 200), (576, 960), (7, 3)])
def test_matches_linear_inside_and_outside_the_packed_rows(
    packing: str, dtype: torch.dtype, tolerance: float, bias: bool, in_features: int,
    out_features: int,
) -> None:
    if packing == "panel_bf16" and in_features % 2 and not _onednn_bf16():
        pytest.skip("an odd K falls back to oneDNN's bf16 path, which this CPU lacks")
    torch.manual_seed(0)
    plain = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    packed = PackedLinear(plain, packing)
    rows = packed_rows(packing, dtype)
    for num_rows in sorted({1, 2, rows.min_rows, 7, 9, 32, rows.max_rows, rows.max_rows + 1}):
        x = torch.randn(num_rows, in_features).to(dtype)
        with torch.inference_mode():
            torch.testing.assert_close(packed(x).float(), plain(x).float(),
                                       rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("packing", ["panel", "onednn_fp32"])
def test_packed_path_is_taken_only_inside_the_range(packing: str) -> None:
    if packing == "panel" and not cpu_ext.gemm_supported():
        pytest.skip("the panel GEMM needs AVX-512 or AVX2")
    plain = nn.Linear(16, 8)
    poisoned = nn.Linear(16, 8)
    with torch.no_grad():
        poisoned.weight.zero_()
        poisoned.bias.copy_(plain.bias)
    packed = PackedLinear(plain, packing)
    packed.packed = PackedLinear(poisoned, packing).packed  # packed copy now computes bias only
    rows = packed_rows(packing, torch.float32)
    with torch.inference_mode():
        inside = packed(torch.ones(rows.min_rows, 16))
        outside = packed(torch.ones(rows.max_rows + 1, 16))
    torch.testing.assert_close(inside, plain.bias.detach().expand_as(inside))
    torch.testing.assert_close(outside, plain(torch.ones(rows.max_rows + 1, 16)).detach())


def test_panel_linear_writes_strided_rows_and_skips_empty_input() -> None:
    if not cpu_ext.gemm_supported():
        pytest.skip("the panel GEMM needs AVX-512 or AVX2")
    weight, bias = torch.randn(40, 24), torch.randn(40)
    packed = cpu_ext.pack_linear_weight(weight)
    assert packed.shape == (3, 24, 16)
    assert torch.equal(packed[2, :, 8:], torch.zeros(24, 8))  # padding columns are zero
    wide = torch.full((5, 50), 7.0)
    x = torch.randn(5, 24)
    cpu_ext.linear_packed(x, packed, bias, 40, out=wide[:, 3:43])
    torch.testing.assert_close(wide[:, 3:43], torch.nn.functional.linear(x, weight, bias))
    assert torch.equal(wide[:, :3], torch.full((5, 3), 7.0))
    assert torch.equal(wide[:, 43:], torch.full((5, 7), 7.0))
    assert cpu_ext.linear_packed(torch.empty(0, 24), packed, None, 40).shape == (0, 40)


@pytest.mark.skipif(not cpu_ext.gemm_bf16_supported(), reason="needs AVX512-BF16 or AVX2")
@pytest.mark.parametrize(("rows", "in_features", "out_features"),
                         [(1, 576, 960), (3, 64, 50), (8, 96, 1536), (13, 2, 33), (20, 576, 49)])
def test_bf16_panels_round_the_fp32_sum_once(rows: int, in_features: int, out_features: int
                                             ) -> None:
    """Products of bf16 pairs summed in fp32, plus the bias, rounded to bf16 once: equal to
    the fp32 reference rounded to bf16, but for a last-bit flip where the summation order
    lands the sum on the other side of a rounding boundary."""
    torch.manual_seed(rows)
    weight = torch.randn(out_features, in_features).to(torch.bfloat16)
    bias = torch.randn(out_features).to(torch.bfloat16)
    x = torch.randn(rows, in_features).to(torch.bfloat16)
    packed = cpu_ext.pack_linear_weight(weight)
    assert packed.shape == (-(-out_features // 16), in_features // 2, 16, 2)
    assert packed[0, 0, 1, 1] == weight[1, 1]  # panel 0, k pair 0, column 1, second of pair
    assert packed[0, -1, 0, 0] == weight[0, in_features - 2]
    for b in (None, bias):
        reference = x.float() @ weight.float().T + (0 if b is None else b.float())
        got = cpu_ext.linear_packed(x, packed, b, out_features)
        assert got.dtype == torch.bfloat16
        rounded = reference.to(torch.bfloat16)
        one_ulp = (rounded.float().abs() * 2.0**-7).clamp_min(1e-30)
        assert ((got.float() - rounded.float()).abs() <= one_ulp).all()
        assert (got == rounded).float().mean() > 0.9


@pytest.mark.skipif(not cpu_ext.gemm_bf16_supported(), reason="needs AVX512-BF16 or AVX2")
@pytest.mark.parametrize(("in_features", "out_features"), [(576, 49), (64, 200), (96, 33)])
def test_bf16_panels_give_the_same_bits_at_every_row_count(in_features: int,
                                                           out_features: int) -> None:
    """Many rows (on AVX2: each panel group widened to fp32 once, then the fp32 tiles) and
    few rows at a time (the weight widened in the register tile) sum the same products in
    the same k order: every row's bits equal whichever way it was computed."""
    torch.manual_seed(out_features)
    weight = torch.randn(out_features, in_features).to(torch.bfloat16)
    bias = torch.randn(out_features).to(torch.bfloat16)
    x = torch.randn(150, in_features).to(torch.bfloat16)
    packed = cpu_ext.pack_linear_weight(weight)
    for b in (None, bias):
        whole = cpu_ext.linear_packed(x, packed, b, out_features)
        pieces = torch.cat([cpu_ext.linear_packed(x[r:r + 7], packed, b, out_features)
                            for r in range(0, 150, 7)])
        assert torch.equal(whole, pieces)
        reference = (x.float() @ weight.float().T + (0 if b is None else b.float()))
        assert (whole == reference.to(torch.bfloat16)).float().mean() > 0.9


@pytest.mark.skipif(not cpu_ext.gemm_bf16_supported(), reason="needs AVX512-BF16 or AVX2")
def test_bf16_panels_refuse_an_odd_k_and_the_layer_falls_back() -> None:
    with pytest.raises(RuntimeError, match="even K"):
        cpu_ext.pack_linear_weight(torch.randn(8, 7).to(torch.bfloat16))
    odd, even = nn.Linear(7, 8).to(torch.bfloat16), nn.Linear(8, 8).to(torch.bfloat16)
    model = nn.Sequential(odd, even)
    assert prepack_linears(model, torch.bfloat16) == (2 if _onednn_bf16() else 1)
    assert isinstance(model[1], PackedLinear) and model[1].packing == "panel_bf16"
    if _onednn_bf16():  # the odd layer on oneDNN's bf16 layout
        assert isinstance(model[0], PackedLinear) and model[0].packing == "onednn_bf16"
    else:  # nothing here packs it: it stays a plain layer
        assert model[0] is odd


def test_bf16_prefill_of_a_long_prompt_matches_the_unpacked_engine(tiny_llama: Path) -> None:
    """A 600-token bf16 prompt is one prefill chunk of 600 rows (on AVX2 the bf16 panels
    widen each panel group once at that size). Its first token's top logprobs equal the
    unpacked engine's (torch's bf16 linear), up to the last bits that the summation order
    moves."""
    prompt = [(7 * i) % 3000 + 100 for i in range(600)]
    params = SamplingParams(temperature=0.0, max_tokens=2, logprobs=5, ignore_eos=True)
    config = {"num_kv_blocks": 64, "dtype": "bfloat16"}
    packed = LLM(model=str(tiny_llama), **config).generate([prompt], params)[0]
    plain = LLM(model=str(tiny_llama), cpu_weight_prepack=False, **config).generate(
        [prompt], params)[0]
    assert packed.token_ids[0] == plain.token_ids[0]
    got, want = packed.logprobs[0].top, plain.logprobs[0].top
    assert [t for t, _ in got] == [t for t, _ in want]
    for (_, x), (_, y) in zip(got, want, strict=True):
        assert abs(x - y) <= 0.05, (x, y)


def test_engine_packs_every_linear_and_keeps_tied_embeddings(tiny_llama_mha_tied: Path) -> None:
    llm = LLM(model=str(tiny_llama_mha_tied), num_kv_blocks=64)
    model = llm.engine.runner.model
    assert not [m for m in model.modules() if type(m) is nn.Linear]
    assert isinstance(model.lm_head, PackedLinear)
    assert model.lm_head.packing == packing_for(torch.float32)
    assert model.lm_head.weight is model.embed_tokens.weight
    plain = LLM(model=str(tiny_llama_mha_tied), num_kv_blocks=64, cpu_weight_prepack=False)
    assert not [m for m in plain.engine.runner.model.modules() if isinstance(m, PackedLinear)]
    # Both paths produce the same greedy tokens (8 rows per decode step: packed in fp32).
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = [[5 + i, 17, 40 + 3 * i] for i in range(8)]
    ours = [o.token_ids for o in llm.generate(prompts, params)]
    assert ours == [o.token_ids for o in plain.generate(prompts, params)]


def test_prepack_linears_counts_replacements() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 2)))
    assert prepack_linears(model, torch.float32) == 2
    assert isinstance(model[0], PackedLinear) and isinstance(model[2][0], PackedLinear)


def test_cli_flag_turns_prepacking_off() -> None:
    from splitserve.cli import _engine_config, build_parser

    parser = build_parser()
    assert _engine_config(parser.parse_args(["serve"])).cpu_weight_prepack is True
    off = parser.parse_args(["serve", "--no-cpu-weight-prepack"])
    assert _engine_config(off).cpu_weight_prepack is False
