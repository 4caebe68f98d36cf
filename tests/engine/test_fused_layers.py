"""The model's fused CPU layer path (backend 'cpu') computes what the unfused one ('torch') does.

Both engines share the weights and the packed linear layers; they differ in the layer's
elementwise ops (fused rope + KV store, silu * mul, residual add + RMSNorm) and in the decode
attention kernel. Prompt-only (prefill) logits use the same attention in both, so they
isolate the fused ops.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from splitserve.common.sampling_params import SamplingParams
from splitserve.kernels import cpu_ext
from splitserve.llm import LLM

pytestmark = pytest.mark.skipif(cpu_ext.load() is None, reason="CPU kernels could not be built")

PROMPTS = [[7, 8, 9], list(range(500, 540)), [42] * 11, [3, 1, 4, 1, 5, 9, 2, 6]]


def _pair(model_dir: Path, dtype: str) -> tuple[LLM, LLM]:
    config = {"num_kv_blocks": 64, "block_size": 8, "dtype": dtype}
    fused = LLM(model=str(model_dir), attention_backend="cpu", **config)
    plain = LLM(model=str(model_dir), attention_backend="torch", **config)
    assert fused.engine.runner.ops.fused is not None
    assert plain.engine.runner.ops.fused is None
    return fused, plain


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 1e-5), ("bfloat16", 0.0)])
def test_prefill_logprobs_match_the_unfused_path(model: str, dtype: str, tolerance: float,
                                                 request: pytest.FixtureRequest) -> None:
    model_dir = request.getfixturevalue(model)
    fused, plain = _pair(model_dir, dtype)
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5, ignore_eos=True)
    for a, b in zip(fused.generate(PROMPTS, params), plain.generate(PROMPTS, params),
                    strict=True):
        assert a.token_ids == b.token_ids
        got, want = a.logprobs[0], b.logprobs[0]
        assert [t for t, _ in got.top] == [t for t, _ in want.top]
        for (_, x), (_, y) in zip(got.top, want.top, strict=True):
            assert abs(x - y) <= tolerance, (x, y)


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen2"])
def test_decode_steps_match_the_unfused_path(model: str, request: pytest.FixtureRequest) -> None:
    model_dir = request.getfixturevalue(model)
    fused, plain = _pair(model_dir, "float32")
    params = SamplingParams(temperature=0.0, max_tokens=16, logprobs=2, ignore_eos=True)
    for a, b in zip(fused.generate(PROMPTS, params), plain.generate(PROMPTS, params),
                    strict=True):
        assert a.token_ids == b.token_ids
        for got, want in zip(a.logprobs, b.logprobs, strict=True):
            assert abs(got.logprob - want.logprob) <= 1e-4
