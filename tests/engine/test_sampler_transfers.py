"""engine.sampler's transfers and its batched arithmetic: one device-to-host copy per step
(`_to_host`) and one host-to-device copy per dtype (`_to_device`) for a batch that mixes
greedy, seeded and unseeded random rows, logprobs, penalties and a grammar mask; and the
same tokens and logprobs as a plain per-row reference written here."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from splitserve.common.sampling_params import SamplingParams
from splitserve.engine import sampler
from splitserve.engine.grammar import allowed_tokens
from splitserve.engine.sampler import TokenHistory, sample, skip_sample_draw

VOCAB = 203  # odd, and not a multiple of the 32 tokens of a bitmask word

PARAMS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.8, top_k=7, seed=1, logprobs=3),
    SamplingParams(temperature=0.0, logprobs=5, repetition_penalty=1.5,
                   logit_bias=((3, 4.0), (500, 1.0))),  # 500: past the vocab, ignored
    SamplingParams(temperature=1.2, top_p=0.6, min_p=0.05, frequency_penalty=0.7,
                   presence_penalty=-0.3),
    SamplingParams(temperature=0.6, seed=9, logprobs=0, repetition_penalty=0.8,
                   frequency_penalty=-1.0, presence_penalty=1.5, logit_bias=((7, -2.5),)),
    SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=4),
]
HISTORIES = [
    None,
    None,
    TokenHistory([1, 3, 3, 8, 200, 8], [8, 200, 8]),
    TokenHistory([5, 6, 6, 6, 9], [6, 6, 9]),
    TokenHistory([7, 7, 11, 12, 7], [7, 12, 7]),
    None,
]
MASK_ROWS = [1, 4]


def batch(step: int) -> tuple[torch.Tensor, tuple[list[int], torch.Tensor]]:
    g = torch.Generator().manual_seed(step)
    logits = torch.randn(len(PARAMS), VOCAB, generator=g) * 3
    for i, history in enumerate(HISTORIES):
        if history is not None:  # the seen tokens lead, close together: penalties decide
            seen = sorted(set(history.token_ids))
            logits[i, seen] = 9.0 + torch.randn(len(seen), generator=g)
    words = torch.randint(-2**31, 2**31 - 1, (len(MASK_ROWS), (VOCAB + 31) // 32),
                          dtype=torch.int32, generator=g)
    words[:, 0] |= 0xFF  # tokens 0..7 always allowed: a row never loses every token
    return logits, (MASK_ROWS, words)


def generators() -> list[torch.Generator | None]:
    return [None if p.greedy else torch.Generator().manual_seed(100 + i)
            for i, p in enumerate(PARAMS)]


def counting(monkeypatch: pytest.MonkeyPatch, name: str) -> list[torch.Tensor]:
    """Wrap sampler.<name> to record its first argument at every call."""
    seen: list[torch.Tensor] = []
    original: Callable[..., torch.Tensor] = getattr(sampler, name)

    def wrapped(tensor: torch.Tensor, *args: object) -> torch.Tensor:
        seen.append(tensor)
        return original(tensor, *args)

    monkeypatch.setattr(sampler, name, wrapped)
    return seen


def test_one_copy_to_the_host_and_one_per_dtype_to_the_device(
        monkeypatch: pytest.MonkeyPatch) -> None:
    to_host = counting(monkeypatch, "_to_host")
    to_device = counting(monkeypatch, "_to_device")
    gens = generators()
    for step in range(4):
        logits, mask = batch(step)
        result = sample(logits, PARAMS, gens, HISTORIES, mask)
        assert len(to_host) == step + 1
        assert to_host[-1].numel() == len(PARAMS) + 3 * (1 + 2 * 5)  # ids, 3 rows' logprobs
        assert [lp is not None for lp in result.logprobs] == [p.logprobs is not None
                                                              for p in PARAMS]
        dtypes = [t.dtype for t in to_device[-2:]]
        assert len(to_device) == 2 * (step + 1) and sorted(map(str, dtypes)) == [
            "torch.float32", "torch.int64"]
    greedy = [SamplingParams(temperature=0.0)] * 3
    sample(torch.randn(3, VOCAB), greedy, [None] * 3)
    assert len(to_host) == 5 and len(to_device) == 8  # nothing to send for plain greedy


def reference_row(logits: torch.Tensor, params: SamplingParams, history: TokenHistory | None,
                  allowed: torch.Tensor | None, generator: torch.Generator | None) -> int:
    """One row, one op at a time: bias, repetition, frequency/presence, the grammar mask,
    then argmax or temperature, top-k, top-p, min-p and the exponential race."""
    row = logits.clone()
    for token, bias in params.logit_bias:
        if token < row.shape[0]:
            row[token] += bias
    if history is not None and params.repetition_penalty != 1.0:
        for token in set(history.token_ids):
            value, p = row[token], params.repetition_penalty
            row[token] = torch.where(value > 0, value / p, value * p)
    if history is not None and (params.frequency_penalty or params.presence_penalty):
        for token in set(history.output_ids):
            count = torch.tensor(float(history.output_ids.count(token)))
            row[token] -= params.frequency_penalty * count + params.presence_penalty
    if allowed is not None:
        row[~allowed] = float("-inf")
    if params.greedy:
        return int(torch.argmax(row))
    row = row / torch.tensor(params.temperature)
    if 0 < params.top_k < row.shape[0]:
        row[row < torch.topk(row, params.top_k).values[-1]] = float("-inf")
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= torch.tensor(params.top_p)
        drop[0] = False
        row[order[drop]] = float("-inf")
    probs = row.softmax(dim=-1)
    if params.min_p > 0.0:
        probs[probs < probs.max() * torch.tensor(params.min_p)] = 0.0
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return int(torch.argmax(probs / noise))


def test_mixed_batch_equals_a_per_row_reference() -> None:
    gens, reference_gens = generators(), generators()
    for step in range(6):
        logits, (rows, words) = batch(step)
        result = sample(logits, PARAMS, gens, HISTORIES, (rows, words))
        allowed = allowed_tokens(words, VOCAB)
        for i, params in enumerate(PARAMS):
            mask = allowed[rows.index(i)] if i in rows else None
            token = reference_row(logits[i], params, HISTORIES[i], mask, reference_gens[i])
            assert result.token_ids[i] == token, (step, i)
            lp = result.logprobs[i]
            if params.logprobs is None:
                assert lp is None
                continue
            log_probs = torch.log_softmax(logits[i], dim=-1)
            top = torch.topk(log_probs, params.logprobs)
            assert lp is not None and lp.token_id == token
            assert lp.logprob == float(log_probs[token])
            assert lp.top == list(zip(top.indices.tolist(), top.values.tolist(), strict=True))


def test_skip_sample_draw_advances_a_generator_as_one_sampled_row_does() -> None:
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(5))
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_p=0.8),
              SamplingParams(temperature=0.0)]
    sampled, skipped = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    sample(logits, params, [None, sampled, None])
    skip_sample_draw(skipped, VOCAB)
    assert torch.equal(sampled.get_state(), skipped.get_state())


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 203])
def test_unpack_bits_equals_the_grammar_bitmask(vocab: int) -> None:
    words = torch.randint(-2**31, 2**31 - 1, (4, (vocab + 31) // 32), dtype=torch.int32,
                          generator=torch.Generator().manual_seed(vocab))
    expected = allowed_tokens(words, vocab)
    assert torch.equal(sampler._unpack_bits(words, vocab), expected)
    assert torch.equal(sampler._unpack_bits(words.to(torch.int64), vocab), expected)


def test_history_ids_past_the_vocabulary_are_ignored() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, frequency_penalty=1.0)
    history = TokenHistory([2, 7, 9], [2, 7])
    row = logits[0].clone()
    sampler.adjust_logits(row, params, history)
    assert row.tolist() == [1.0, 2.0, 3.0 / 2.0 - 1.0]
    assert sample(logits, [params], [None], [history]).token_ids == [1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_step_synchronises_only_in_to_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's sync debug mode raises on any synchronising call (a pageable copy, .item(),
    .tolist() of a device tensor) outside the one copy back; greedy rows equal the CPU's."""
    original = sampler._to_host

    def allowed(packed: torch.Tensor) -> torch.Tensor:
        torch.cuda.set_sync_debug_mode(0)
        try:
            return original(packed)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(sampler, "_to_host", allowed)
    device = torch.device("cuda")
    gens = [None if p.greedy else torch.Generator(device).manual_seed(100 + i)
            for i, p in enumerate(PARAMS)]
    for step in range(3):
        logits, mask = batch(step)
        on_device = logits.to(device)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            result = sample(on_device, PARAMS, gens, HISTORIES, mask)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        on_cpu = sample(logits, PARAMS, generators(), HISTORIES, mask)
        for i, params in enumerate(PARAMS):
            lp, cpu_lp = result.logprobs[i], on_cpu.logprobs[i]
            assert (lp is None) == (params.logprobs is None)
            if not params.greedy:
                continue
            assert result.token_ids[i] == on_cpu.token_ids[i]
            if lp is not None and cpu_lp is not None:
                assert lp.logprob == pytest.approx(cpu_lp.logprob, abs=1e-4)
                assert [t for t, _ in lp.top] == [t for t, _ in cpu_lp.top]
