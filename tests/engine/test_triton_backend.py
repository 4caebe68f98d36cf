"""The engine with the Triton kernels (under TRITON_INTERPRET=1 on CPU) gives the same greedy
tokens as with the torch reference kernels, and both match transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from splitserve.common.sampling_params import SamplingParams
from splitserve.kernels.backend import triton_available
from splitserve.llm import LLM
from tests.engine.hf_reference import assert_greedy_equal, hf_greedy

pytestmark = pytest.mark.skipif(not triton_available(torch.device("cpu")),
                                reason="triton is not importable")


def test_triton_backend_matches_torch_and_transformers(tiny_qwen2: Path) -> None:
    prompts = [[7, 8, 9], list(range(500, 523)), [42] * 11]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    config = {"num_kv_blocks": 32, "block_size": 4, "max_num_batched_tokens": 8}
    triton_llm = LLM(model=str(tiny_qwen2), attention_backend="triton", **config)
    assert triton_llm.engine.runner.ops.name == "triton"
    torch_llm = LLM(model=str(tiny_qwen2), attention_backend="torch", **config)
    triton_out = triton_llm.generate(prompts, params)
    torch_out = torch_llm.generate(prompts, params)
    for prompt, a, b in zip(prompts, triton_out, torch_out, strict=True):
        assert a.token_ids == b.token_ids
        assert_greedy_equal(tiny_qwen2, prompt, a.token_ids, hf_greedy(tiny_qwen2, prompt, 6))
