"""Prepacked CPU linear layers: same outputs as nn.Linear at every row count, tied weights kept."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from engine.cpu_linear import _PACKED_ROWS, PackedLinear, prepack_linears, prepack_supported
from engine.sampling_params import SamplingParams
from splitserve.llm import LLM

pytestmark = pytest.mark.skipif(
    not prepack_supported(torch.float32, torch.device("cpu")), reason="no oneDNN in this torch"
)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_linear_inside_and_outside_the_packed_rows(dtype: torch.dtype, tolerance: float,
                                                           bias: bool) -> None:
    torch.manual_seed(0)
    plain = nn.Linear(96, 200, bias=bias).to(dtype)
    packed_rows = _PACKED_ROWS[dtype]
    packed = PackedLinear(plain, packed_rows)
    for rows in sorted({1, 2, packed_rows.min_rows, 7, 32, packed_rows.max_rows,
                        packed_rows.max_rows + 1, 600}):
        x = torch.randn(rows, 96).to(dtype)
        with torch.inference_mode():
            torch.testing.assert_close(packed(x).float(), plain(x).float(),
                                       rtol=tolerance, atol=tolerance)


def test_packed_path_is_taken_only_inside_the_range() -> None:
    plain = nn.Linear(16, 8)
    rows = _PACKED_ROWS[torch.float32]
    packed = PackedLinear(plain, rows)
    packed.packed = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 16), 32)  # poison
    with torch.inference_mode():
        inside = packed(torch.ones(rows.min_rows, 16))
        outside = packed(torch.ones(rows.max_rows + 1, 16))
    torch.testing.assert_close(inside, plain.bias.detach().expand_as(inside))
    torch.testing.assert_close(outside, plain(torch.ones(rows.max_rows + 1, 16)).detach())


def test_engine_packs_every_linear_and_keeps_tied_embeddings(tiny_llama_mha_tied: Path) -> None:
    llm = LLM(model=str(tiny_llama_mha_tied), num_kv_blocks=64)
    model = llm.engine.runner.model
    assert not [m for m in model.modules() if type(m) is nn.Linear]
    assert isinstance(model.lm_head, PackedLinear)
    assert model.lm_head.weight is model.embed_tokens.weight
    plain = LLM(model=str(tiny_llama_mha_tied), num_kv_blocks=64, cpu_weight_prepack=False)
    assert not [m for m in plain.engine.runner.model.modules() if isinstance(m, PackedLinear)]
    # Both paths produce the same greedy tokens (batch of 8 rows: the packed range in fp32).
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = [[5 + i, 17, 40 + 3 * i] for i in range(8)]
    ours = [o.token_ids for o in llm.generate(prompts, params)]
    assert ours == [o.token_ids for o in plain.generate(prompts, params)]


def test_prepack_linears_counts_replacements() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 2)))
    assert prepack_linears(model, torch.float32) == 2
    assert isinstance(model[0], PackedLinear) and isinstance(model[2][0], PackedLinear)
