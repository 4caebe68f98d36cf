"""The online step-time fit (common/step_time.py) on synthetic timings with known costs."""

from __future__ import annotations

import random

import pytest

from splitserve.common.step_time import StepTimeFit, StepTimeModel


def _observe(fit: StepTimeFit, base: float, per_seq: float, per_token: float,
             num_seqs: int, prompt_tokens: int, noise: float = 0.0,
             rng: random.Random | None = None) -> None:
    ms = base + per_seq * num_seqs + per_token * prompt_tokens
    if rng is not None:
        ms *= 1 + rng.uniform(-noise, noise)
    fit.observe(ms / 1e3, num_seqs, prompt_tokens)


def test_the_fit_recovers_known_costs() -> None:
    fit = StepTimeFit(token_budget=512)
    rng = random.Random(0)
    for _ in range(200):
        seqs = rng.randint(1, 32)
        prompt = rng.choice([0, 0, 0, rng.randint(16, 512)])
        _observe(fit, 4.0, 0.5, 0.1, seqs, prompt, noise=0.02, rng=rng)
    model = fit.model()
    assert model is not None
    assert model.base_ms == pytest.approx(4.0, rel=0.15)
    assert model.per_seq_ms == pytest.approx(0.5, rel=0.1)
    assert model.per_prompt_token_ms == pytest.approx(0.1, rel=0.1)
    assert model.token_budget == 512


def test_no_model_before_prompt_steps_and_a_prefill_only_worker_gets_one() -> None:
    fit = StepTimeFit(token_budget=256)
    for seqs in (1, 2, 3, 4, 5):
        _observe(fit, 2.0, 1.0, 0.0, seqs, 0)
    assert fit.model() is None  # never prefilled: nothing known of prompt costs
    prefill_only = StepTimeFit(token_budget=256)
    for tokens in (100, 200, 256):
        _observe(prefill_only, 0.0, 0.0, 0.2, 1, tokens)
    model = prefill_only.model()
    assert model is not None and (model.base_ms, model.per_seq_ms) == (0.0, 0.0)
    assert model.per_prompt_token_ms == pytest.approx(0.2)


def test_a_batch_that_never_varies_gives_a_flat_line() -> None:
    fit = StepTimeFit(token_budget=64)
    for _ in range(10):
        _observe(fit, 3.0, 1.0, 0.0, 4, 0)  # always 4 sequences: 7 ms
    for _ in range(3):
        _observe(fit, 3.0, 1.0, 0.5, 4, 20)  # 7 + 10 ms
    model = fit.model()
    assert model is not None
    assert (model.base_ms, model.per_seq_ms) == (pytest.approx(7.0), 0.0)
    assert model.step_ms(4) == pytest.approx(7.0)
    assert model.per_prompt_token_ms == pytest.approx(0.5)


def test_bad_samples_are_ignored() -> None:
    fit = StepTimeFit(token_budget=64)
    fit.observe(float("nan"), 3, 0)
    fit.observe(0.01, 0, 0)
    fit.observe(-1.0, 2, 10)
    assert fit.model() is None


def test_prefill_time_counts_chunks_and_the_batch_they_share() -> None:
    model = StepTimeModel(base_ms=2.0, per_seq_ms=0.5, per_prompt_token_ms=0.1,
                          token_budget=100)
    assert model.prefill_ms(0, 8) == 0.0
    # 250 tokens: 3 chunks, each a step with 8 running + the prompt's own sequence.
    assert model.prefill_ms(250, 8) == pytest.approx(3 * (2.0 + 0.5 * 9) + 25.0)
    assert model.step_ms(8, 50) == pytest.approx(2.0 + 4.0 + 5.0)
