"""Presence, frequency and repetition penalties and logit_bias: the sampler's arithmetic,
greedy decoding against a transformers reference loop, and continuity across a resume
(a prompt that ends with the request's own output counts it as output)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from splitserve.common.sampling_params import SamplingParams
from splitserve.engine.sampler import TokenHistory, adjust_logits, sample
from splitserve.llm import LLM
from tests.engine.hf_reference import hf_logits

PROMPT = [5, 9, 9, 23, 71, 5, 300, 301, 302, 9]


def test_adjust_logits_arithmetic() -> None:
    row = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0, 1.0])
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25,
                            repetition_penalty=2.0, logit_bias={5: -10.0, 0: 1.0, 99: 3.0})
    history = TokenHistory(token_ids=[1, 3, 3, 4], output_ids=[3, 3, 4])
    adjust_logits(row, params, history)
    expected = [2.0 + 1.0,  # bias only (not seen)
                -1.0 * 2.0,  # seen in the prompt: negative, multiplied
                0.5,  # untouched
                3.0 / 2.0 - (0.25 * 2 + 0.5),  # prompt+output, then twice in the output
                -2.0 * 2.0 - (0.25 * 1 + 0.5),
                1.0 - 10.0]  # bias; id 99 is past this vocabulary and ignored
    assert row.tolist() == pytest.approx(expected)


def test_sample_needs_a_history_for_adjusted_rows_and_keeps_raw_logprobs() -> None:
    logits = torch.tensor([[0.0, 1.0, 0.9], [0.0, 1.0, 0.9]])
    biased = SamplingParams(temperature=0.0, logit_bias={2: 5.0}, logprobs=0)
    with pytest.raises(ValueError, match="no token history"):
        sample(logits, [biased, SamplingParams(temperature=0.0)], [None, None])
    out = sample(logits, [biased, SamplingParams(temperature=0.0)], [None, None],
                 [TokenHistory([1], []), None])
    assert out.token_ids == [2, 1]
    raw = torch.log_softmax(logits[0], dim=-1)[2]
    assert out.logprobs[0] is not None and out.logprobs[0].logprob == pytest.approx(float(raw))
    assert logits[0].tolist() == pytest.approx([0.0, 1.0, 0.9])  # the caller's, untouched


def _reference(model_dir: Path, params: SamplingParams, n: int) -> list[int]:
    """Greedy with the penalties written out independently over transformers' logits."""
    out: list[int] = []
    for _ in range(n):
        logits = hf_logits(model_dir, PROMPT + out).clone()
        for token, bias in params.logit_bias:
            logits[token] += bias
        for token in set(PROMPT + out):
            value = float(logits[token])
            p = params.repetition_penalty
            logits[token] = value / p if value > 0 else value * p
        for token in set(out):
            logits[token] -= params.frequency_penalty * out.count(token) + params.presence_penalty
        out.append(int(torch.argmax(logits)))
    return out


# A random-weight model never repeats a token by itself: a bias on token 42 (its logit is
# ~0.6, the best ~4.8) makes it repeat, and each penalty must then break the repetition.
BIAS = {42: 6.0}


@pytest.mark.parametrize("penalty", [
    {"frequency_penalty": 1.5},
    {"presence_penalty": 2.0},
    {"repetition_penalty": 2.0},
    {"frequency_penalty": -0.5, "presence_penalty": 1.0, "repetition_penalty": 1.2},
])
def test_greedy_penalties_equal_a_transformers_reference(tiny_llama: Path,
                                                         penalty: dict[str, float]) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logit_bias=BIAS,
                            **penalty)  # type: ignore[arg-type]
    biased_only = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True,
                                 logit_bias=BIAS)
    llm = LLM(model=str(tiny_llama), num_kv_blocks=64, block_size=8)
    ours, repeating = (o.token_ids for o in llm.generate([PROMPT, PROMPT],
                                                         [params, biased_only]))
    assert repeating == [42] * 16
    assert ours == _reference(tiny_llama, params, 16)
    assert ours != repeating  # the penalty acted


def test_a_resumed_penalized_request_continues_the_same_stream(tiny_llama: Path) -> None:
    """The prompt's last k tokens are the request's own output (num_sampled=k): they count
    for the frequency and presence penalties, so the continuation equals the whole run."""
    params = SamplingParams(temperature=0.8, top_k=20, seed=3, max_tokens=30, ignore_eos=True,
                            frequency_penalty=1.2, presence_penalty=0.4, logit_bias=BIAS)
    llm = LLM(model=str(tiny_llama), num_kv_blocks=64, block_size=8)
    whole = llm.generate([PROMPT], params)[0].token_ids
    k = 11
    assert whole[:k].count(42) >= 2  # the penalties had something to count
    rest = SamplingParams(temperature=0.8, top_k=20, seed=3, max_tokens=30 - k,
                          ignore_eos=True, frequency_penalty=1.2, presence_penalty=0.4,
                          logit_bias=BIAS)
    engine = llm.engine
    engine.add_request([*PROMPT, *whole[:k]], rest, "resumed", num_sampled=k)
    got: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            got.extend(out.new_token_ids)
    assert got == whole[k:]
