"""engine.cuda_graphs: the batch-size ladder, and decode steps through the static buffers.

On a CPU the static-buffer path runs eagerly (`build_decode_graphs(capture=False)`): the
padding rows, bucketing and fixed kernel launches are the ones a captured graph replays, so
the tokens and the KV pool must equal the plain eager path's. The capture itself runs only
on CUDA (the `gpu` tests).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from splitserve.common.sampling_params import SamplingParams
from splitserve.engine.cuda_graphs import capture_sizes, padded_size
from splitserve.kernels.backend import triton_available
from splitserve.llm import LLM
from tests.engine.hf_reference import assert_greedy_equal, hf_greedy


def test_capture_sizes_ladder() -> None:
    assert capture_sizes(1) == [1]
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert capture_sizes(4096)[-1] == 512  # capped
    for top in range(1, 80):
        sizes = capture_sizes(top)
        assert sizes == sorted(set(sizes)) and sizes[0] == 1 and sizes[-1] == top


def test_padded_size_is_the_smallest_that_fits() -> None:
    sizes = capture_sizes(64)
    assert padded_size(sizes, 1) == 1
    assert padded_size(sizes, 3) == 4
    assert padded_size(sizes, 9) == 16
    assert padded_size(sizes, 17) == 24
    assert padded_size(sizes, 64) == 64
    assert padded_size(sizes, 65) is None
    for n in range(1, 65):
        size = padded_size(sizes, n)
        assert size is not None and size >= n and all(s < n for s in sizes if s < size)


_PROMPTS = [[7, 8, 9], list(range(500, 523)), [42] * 11, list(range(900, 940)), [5] * 2]
# Different lengths: the batch shrinks from 5 to 1 as requests finish (padded to 8, 4, 2, 1).
_MAX_TOKENS = [9, 4, 12, 6, 2]


_CONFIG = {"num_kv_blocks": 24, "block_size": 4, "max_num_seqs": 8,
           "max_num_batched_tokens": 16}  # chunked prompts, preemption, 1..5 decoding


def _generate(llm: LLM, static: bool, num_sms: int | None = None
              ) -> tuple[list[list[int]], torch.Tensor, int]:
    runner = llm.engine.runner
    runner.graphs = runner.build_decode_graphs(capture=False, num_sms=num_sms) if static else None
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in _MAX_TOKENS]
    outs = llm.generate(_PROMPTS, params)
    replays = runner.graphs.replays if runner.graphs is not None else 0
    return [o.token_ids for o in outs], runner.kv_pool.clone(), replays


def _backends() -> list[str]:
    available = ["torch", "cpu"]
    if triton_available(torch.device("cpu")):
        available.append("triton")
    return available


@pytest.mark.parametrize("backend", _backends())
def test_static_decode_path_equals_eager(tiny_llama: Path, backend: str) -> None:
    eager_tokens, eager_pool, _ = _generate(LLM(model=str(tiny_llama),
                                                attention_backend=backend, **_CONFIG), False)
    # num_sms 64 makes the Triton kernel's fixed split count 8 (most splits empty here).
    tokens, pool, replays = _generate(LLM(model=str(tiny_llama), attention_backend=backend,
                                          **_CONFIG), True, num_sms=64)
    assert tokens == eager_tokens
    assert replays > 0
    # Padding rows wrote nothing: the same slots hold KV (the pool starts zeroed), with the
    # same values up to the GEMM's rounding at another row count (MKL blocks by rows; the
    # C++ kernels do not, and match exactly).
    assert torch.equal(pool == 0, eager_pool == 0)
    torch.testing.assert_close(pool, eager_pool, atol=1e-5, rtol=0)


def test_static_triton_path_matches_transformers(tiny_qwen2: Path) -> None:
    if not triton_available(torch.device("cpu")):
        pytest.skip("triton is not importable")
    llm = LLM(model=str(tiny_qwen2), attention_backend="triton", **_CONFIG)
    tokens, _, replays = _generate(llm, True, num_sms=16)
    assert replays > 0
    for prompt, got, n in zip(_PROMPTS, tokens, _MAX_TOKENS, strict=True):
        assert_greedy_equal(tiny_qwen2, prompt, got, hf_greedy(tiny_qwen2, prompt, n))


def test_graphs_are_off_on_cpu(tiny_llama: Path) -> None:
    assert LLM(model=str(tiny_llama), **_CONFIG).engine.runner.graphs is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_match_eager_and_transformers(tiny_llama: Path) -> None:
    config = {**_CONFIG, "device": "cuda", "dtype": "float32", "attention_backend": "triton"}
    graphed = LLM(model=str(tiny_llama), **config)
    assert graphed.engine.runner.graphs is not None
    eager = LLM(model=str(tiny_llama), enforce_eager=True, **config)
    assert eager.engine.runner.graphs is None
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in _MAX_TOKENS]
    got = [o.token_ids for o in graphed.generate(_PROMPTS, params)]
    assert graphed.engine.runner.graphs.replays > 0
    assert got == [o.token_ids for o in eager.generate(_PROMPTS, params)]
    for prompt, tokens, n in zip(_PROMPTS, got, _MAX_TOKENS, strict=True):
        assert_greedy_equal(tiny_llama, prompt, tokens, hf_greedy(tiny_llama, prompt, n))
