"""What the KV cache dtype tests share (test_kv_fp8_engine.py, test_kv_half_cache.py):
seeded prompts, how far a run's greedy tokens follow a baseline's, and every attention
backend's tokens with one cache dtype, compared."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from splitserve.common.outputs import RequestOutput
from splitserve.common.sampling_params import SamplingParams
from splitserve.llm import LLM

BACKENDS = ("torch", "cpu", "triton")


def prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(49152) for _ in range(n)] for n in lengths]


def first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def divergence(want: list[RequestOutput], got: list[RequestOutput]
               ) -> tuple[list[int], list[float]]:
    """Per prompt, the first token where `got` parts from `want`; and |dlogprob| of every
    token before that (the runs asked for logprobs)."""
    diverged = [first_divergence(w.token_ids, g.token_ids) for w, g in zip(want, got, strict=True)]
    diffs = [abs(a.logprob - b.logprob) for w, g, n in zip(want, got, diverged, strict=True)
             for a, b in zip(w.logprobs[:n], g.logprobs[:n], strict=True)]
    return diverged, diffs


def assert_backends_agree(model_dir: Path, kv_cache_dtype: str) -> None:
    """Every backend (torch, C++, Triton) gives the same greedy tokens with a cache of
    `kv_cache_dtype`: their stores write the same bytes, their reads decode them alike.
    max_num_batched_tokens 16: the longer prompts prefill in chunks, whose later chunks
    attend to the earlier ones' rows read back from the cache."""
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    config: dict[str, Any] = {"num_kv_blocks": 64, "block_size": 4, "max_num_batched_tokens": 16}
    tokens = {}
    for backend in BACKENDS:
        llm = LLM(model=str(model_dir), attention_backend=backend, kv_cache_dtype=kv_cache_dtype,
                  **config)
        assert llm.engine.runner.ops.name == backend
        tokens[backend] = [o.token_ids for o in llm.generate(prompts(1, [3, 23, 11, 40]), params)]
    assert tokens["cpu"] == tokens["torch"] and tokens["triton"] == tokens["torch"], tokens
