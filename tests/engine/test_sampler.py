"""engine.sampler on CPU: greedy, per-request seeded generators, top-k / top-p / min-p
supports and frequencies, and logprobs against log_softmax of the raw logits."""

from __future__ import annotations

import math

import pytest
import torch

from splitserve.common.sampling_params import SamplingParams
from splitserve.engine.sampler import _filtered_probs, sample

VOCAB = 32


def random_logits(rows: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def draw_many(
    logits_row: torch.Tensor, params: SamplingParams, draws: int, seed: int = 0
) -> list[int]:
    """`draws` independent samples of one row, all in one batch (each row its own generator)."""
    logits = logits_row.unsqueeze(0).expand(draws, -1).contiguous()
    generator = gen(seed)
    return sample(logits, [params] * draws, [generator] * draws).token_ids


def logits_for(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float32).log()


def test_greedy_rows_are_argmax() -> None:
    logits = random_logits(6)
    params = [SamplingParams(temperature=0.0)] * 6
    result = sample(logits, params, [None] * 6)
    assert result.token_ids == logits.argmax(dim=-1).tolist()
    assert result.logprobs == [None] * 6


def test_greedy_ties_take_the_first_index_like_transformers() -> None:
    logits = torch.zeros(3, 49152)
    logits[0, [7, 900, 40000]] = 2.0  # a three-way tie at the maximum
    logits[1, [48000, 12]] = 1.5
    logits[2] = 0.25  # every token tied
    result = sample(logits, [SamplingParams(temperature=0.0)] * 3, [None] * 3)
    assert result.token_ids == [7, 12, 0]


def test_top_k_one_is_greedy_even_at_high_temperature() -> None:
    logits = random_logits(4, seed=1)
    params = [SamplingParams(temperature=5.0, top_k=1)] * 4
    result = sample(logits, params, [gen(i) for i in range(4)])
    assert result.token_ids == logits.argmax(dim=-1).tolist()


def test_mixed_batch_greedy_rows_unaffected() -> None:
    logits = random_logits(4, seed=2)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.5, seed=1),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.9, top_p=0.5, seed=2),
    ]
    result = sample(logits, params, [None, gen(1), None, gen(2)])
    argmax = logits.argmax(dim=-1).tolist()
    assert result.token_ids[0] == argmax[0] and result.token_ids[2] == argmax[2]


def test_seeded_rows_do_not_depend_on_their_batch() -> None:
    """The same seeded request gives the same tokens alone, or beside other rows in any order."""
    target = random_logits(1, seed=3)[0]
    p_target = SamplingParams(temperature=1.3, top_k=20, top_p=0.95, min_p=0.01, seed=7)
    others = random_logits(3, seed=4)
    p_others = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_k=3, seed=1),
        SamplingParams(temperature=2.0, top_p=0.3, min_p=0.2, seed=2),
    ]

    def run(batch: list[int]) -> list[int]:
        """batch: -1 is the target row, i >= 0 is others[i]; 8 steps, fresh generators."""
        generators = {i: gen(100 + i) for i in batch}
        generators[-1] = gen(7)
        logits = torch.stack([target if i < 0 else others[i] for i in batch])
        params = [p_target if i < 0 else p_others[i] for i in batch]
        gens = [None if params[j].greedy else generators[i] for j, i in enumerate(batch)]
        row = batch.index(-1)
        return [sample(logits, params, gens).token_ids[row] for _ in range(8)]

    alone = run([-1])
    assert len(set(alone)) > 1  # a real random stream, not a constant
    assert run([0, -1, 2]) == alone
    assert run([2, 1, 0, -1]) == alone
    assert run([-1, 1]) == alone


def test_seed_changes_the_stream() -> None:
    row = random_logits(1, seed=5)[0]
    params = SamplingParams(temperature=1.0)
    assert draw_many(row, params, 64, seed=1) != draw_many(row, params, 64, seed=2)
    assert draw_many(row, params, 64, seed=1) == draw_many(row, params, 64, seed=1)


def test_top_k_never_samples_outside_the_top_k() -> None:
    row = random_logits(1, seed=6)[0]
    top4 = set(torch.topk(row, 4).indices.tolist())
    drawn = draw_many(row, SamplingParams(temperature=3.0, top_k=4), 2000)
    assert set(drawn) == top4  # every one of the 4 shows up at temperature 3


def test_top_p_keeps_the_minimal_nucleus_with_plausible_frequencies() -> None:
    row = logits_for([0.5, 0.3, 0.15, 0.05])
    drawn = draw_many(row, SamplingParams(top_p=0.7), 4000)
    assert set(drawn) == {0, 1}
    # Renormalized nucleus: P(0) = 0.5 / 0.8 = 0.625; binomial sd ~0.0077.
    assert drawn.count(0) / len(drawn) == pytest.approx(0.625, abs=0.04)


def test_top_p_always_keeps_the_most_likely_token() -> None:
    row = logits_for([0.6, 0.3, 0.1])
    assert set(draw_many(row, SamplingParams(top_p=0.1), 500)) == {0}


def test_plain_sampling_frequencies() -> None:
    row = logits_for([0.5, 0.3, 0.15, 0.05])
    drawn = draw_many(row, SamplingParams(), 4000)
    freqs = [drawn.count(i) / len(drawn) for i in range(4)]
    for got, want in zip(freqs, [0.5, 0.3, 0.15, 0.05], strict=True):
        assert got == pytest.approx(want, abs=0.03)


def test_temperature_sharpens() -> None:
    row = logits_for([0.5, 0.3, 0.15, 0.05])
    drawn = draw_many(row, SamplingParams(temperature=0.5), 4000)
    # probs ** 2 renormalized: 0.25 / (0.25 + 0.09 + 0.0225 + 0.0025) = 0.685
    assert drawn.count(0) / len(drawn) == pytest.approx(0.685, abs=0.04)


def test_min_p_drops_tokens_below_min_p_times_the_max() -> None:
    row = logits_for([0.4, 0.3, 0.15, 0.1, 0.05])
    drawn = draw_many(row, SamplingParams(min_p=0.3), 4000)  # threshold 0.12
    assert set(drawn) == {0, 1, 2}
    assert drawn.count(0) / len(drawn) == pytest.approx(0.4 / 0.85, abs=0.04)


def test_filters_compose_as_masks() -> None:
    logits = logits_for([0.4, 0.3, 0.15, 0.1, 0.05]).unsqueeze(0)
    probs = _filtered_probs(logits, [SamplingParams(top_k=4, top_p=0.7)])
    # top-k keeps 4 (mass 0.95); over those renormalized, 0.4/0.95 + 0.3/0.95 = 0.737 >= 0.7.
    expected = torch.tensor([[0.4, 0.3, 0.0, 0.0, 0.0]]) / 0.7
    torch.testing.assert_close(probs, expected)


def test_top_p_one_keeps_full_support_beside_a_top_p_row() -> None:
    logits = torch.tensor([[0.0, -17.0, -18.0]])
    alone = _filtered_probs(logits, [SamplingParams()])
    batched = _filtered_probs(logits.repeat(2, 1), [SamplingParams(), SamplingParams(top_p=0.5)])
    assert bool((alone > 0).all())
    torch.testing.assert_close(batched[0], alone[0], rtol=0, atol=0)


def test_logprobs_are_of_the_raw_logits() -> None:
    logits = random_logits(3, seed=8)
    params = [
        SamplingParams(temperature=0.0, logprobs=5),
        SamplingParams(temperature=2.0, top_k=3, logprobs=2, seed=0),
        SamplingParams(temperature=0.5, logprobs=0, seed=1),
    ]
    result = sample(logits, params, [None, gen(0), gen(1)])
    reference = torch.log_softmax(logits.double(), dim=-1)
    for i, n in enumerate([5, 2, 0]):
        lp = result.logprobs[i]
        assert lp is not None
        token = result.token_ids[i]
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(float(reference[i, token]), abs=1e-5)
        order = torch.argsort(reference[i], descending=True)[:n].tolist()
        assert [t for t, _ in lp.top] == order
        assert [v for _, v in lp.top] == pytest.approx(reference[i, order].tolist(), abs=1e-5)
        assert all(a >= b for (_, a), (_, b) in zip(lp.top, lp.top[1:], strict=False))
    greedy_row = result.logprobs[0]
    assert greedy_row is not None and greedy_row.top[0][0] == result.token_ids[0]


def test_logprobs_only_for_rows_that_ask() -> None:
    logits = random_logits(2, seed=9)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, logprobs=1)]
    result = sample(logits, params, [None, None])
    assert result.logprobs[0] is None
    assert result.logprobs[1] is not None
    assert math.isfinite(result.logprobs[1].logprob)
