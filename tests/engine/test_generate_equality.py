"""End-to-end truth: greedy tokens from every engine path equal transformers' greedy tokens."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from splitserve.common.sampling_params import SamplingParams
from splitserve.llm import LLM
from tests.engine.hf_reference import assert_greedy_equal, hf_greedy

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def _prompts(seed: int, lengths: list[int], vocab: int = 49152) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def _check(model_dir: Path, prompts: list[list[int]], outputs: list, max_tokens: int) -> None:
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out.finish_reason == "length"
        assert_greedy_equal(model_dir, prompt, out.token_ids, hf_greedy(model_dir, prompt, max_tokens))


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_llama_mha_tied", "tiny_qwen2"])
def test_tiny_models_match_transformers(model: str, request: pytest.FixtureRequest) -> None:
    model_dir = request.getfixturevalue(model)
    prompts = _prompts(0, [1, 5, 17, 33, 64])
    llm = LLM(model=str(model_dir), num_kv_blocks=128, block_size=16)
    _check(model_dir, prompts, llm.generate(prompts, GREEDY), GREEDY.max_tokens)
    llm.engine.block_manager.check_invariants([])
    assert llm.engine.block_manager.num_free_blocks == 128


@pytest.mark.parametrize("block_size", [1, 16, 7])
def test_block_sizes(block_size: int, tiny_llama: Path) -> None:
    prompts = _prompts(1, [3, 14, 29, 40])  # 7 divides none of them
    llm = LLM(model=str(tiny_llama), num_kv_blocks=4096 // block_size, block_size=block_size)
    _check(tiny_llama, prompts, llm.generate(prompts, GREEDY), GREEDY.max_tokens)


def test_chunked_prefill_small_token_budget(tiny_qwen2: Path) -> None:
    prompts = _prompts(2, [50, 9, 31, 70])
    llm = LLM(model=str(tiny_qwen2), num_kv_blocks=64, block_size=8, max_num_batched_tokens=12)
    _check(tiny_qwen2, prompts, llm.generate(prompts, GREEDY), GREEDY.max_tokens)


def test_preemption_by_recompute(tiny_llama: Path) -> None:
    # 8 sequences that need ~5 blocks each at the end, in a pool of 16 blocks.
    prompts = _prompts(3, [10, 12, 8, 14, 9, 11, 13, 7])
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    llm = LLM(model=str(tiny_llama), num_kv_blocks=16, block_size=8)
    preemptions = 0
    original = llm.engine.scheduler._preempt

    def counting_preempt(seq):  # type: ignore[no-untyped-def]
        nonlocal preemptions
        preemptions += 1
        original(seq)

    llm.engine.scheduler._preempt = counting_preempt  # type: ignore[method-assign]
    outputs = llm.generate(prompts, params)
    assert preemptions > 0, "the pool was meant to be small enough to force preemption"
    _check(tiny_llama, prompts, outputs, params.max_tokens)
    assert llm.engine.block_manager.num_free_blocks == 16


def test_prefix_cache_hits_give_same_tokens(tiny_llama: Path) -> None:
    system = _prompts(4, [40])[0]
    prompts = [system + tail for tail in _prompts(5, [3, 9, 1])]
    llm = LLM(model=str(tiny_llama), num_kv_blocks=128, block_size=8)
    first = llm.generate(prompts[:1], GREEDY)
    second = llm.generate(prompts, GREEDY)
    assert first[0].num_cached_tokens == 0
    assert all(out.num_cached_tokens >= 40 for out in second), [o.num_cached_tokens for o in second]
    _check(tiny_llama, prompts, second, GREEDY.max_tokens)
    assert first[0].token_ids == second[0].token_ids
    stats = llm.engine.block_manager.stats
    assert stats.hits > 0 and 0.0 < stats.hit_rate < 1.0


def test_mixed_parameters_in_one_batch(tiny_llama: Path) -> None:
    prompts = _prompts(6, [5, 20, 11, 3])
    params = [
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.8, seed=7, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=1.2, top_k=20, min_p=0.05, seed=3, max_tokens=17),
    ]
    llm = LLM(model=str(tiny_llama), num_kv_blocks=128, block_size=16)
    outputs = llm.generate(prompts, params)
    assert_greedy_equal(tiny_llama, prompts[0], outputs[0].token_ids, hf_greedy(tiny_llama, prompts[0], 24))
    assert_greedy_equal(tiny_llama, prompts[2], outputs[2].token_ids, hf_greedy(tiny_llama, prompts[2], 5))
    assert len(outputs[1].token_ids) == 10
    assert outputs[2].logprobs is not None and len(outputs[2].logprobs) == 5
    assert all(len(lp.top) == 3 and lp.top[0][0] == lp.token_id for lp in outputs[2].logprobs)
    # The seeded sampled requests are reproducible alone, in another batch composition.
    alone = llm.generate([prompts[1], prompts[3]], [params[1], params[3]])
    assert alone[0].token_ids == outputs[1].token_ids
    assert alone[1].token_ids == outputs[3].token_ids


def test_smollm2_matches_transformers(smollm2_dir: Path) -> None:
    llm = LLM(model="smollm2-135m", num_kv_blocks=512)
    questions = [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "hi",
        "Explain, step by step and with an example, how a hash map handles collisions.",
        "List three prime numbers.",
        "Translate 'good morning' into Spanish, French and German.",
        "Summarize the plot of a story about a robot who learns to paint, in a few sentences.",
        "Why is the sky blue?",
    ]
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    assert len({len(p) for p in prompts}) >= 6
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    _check(smollm2_dir, prompts, outputs, 48)
    assert "Paris" in outputs[0].text
