"""SamplingParams validation and normalization."""

from __future__ import annotations

import dataclasses
import math

import pytest

from splitserve.common.sampling_params import SamplingParams


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop_token_ids": [3, -1]}, "stop_token_ids"),
    ],
)
def test_invalid_values_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0.0},
        {"top_p": 1e-6},
        {"top_p": 1.0},
        {"max_tokens": 1},
        {"top_k": 0},
        {"min_p": 0.0},
        {"min_p": 1.0},
        {"logprobs": 0},
        {"logprobs": 20},
    ],
)
def test_boundary_values_are_accepted(kwargs: dict[str, object]) -> None:
    params = SamplingParams(**kwargs)  # type: ignore[arg-type]
    for key, value in kwargs.items():
        assert getattr(params, key) == value


def test_stop_string_becomes_a_one_tuple() -> None:
    assert SamplingParams(stop="END").stop == ("END",)  # type: ignore[arg-type]
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")  # type: ignore[arg-type]
    assert SamplingParams().stop == ()


def test_stop_token_ids_become_an_int_tuple() -> None:
    params = SamplingParams(stop_token_ids=[5, 7])  # type: ignore[arg-type]
    assert params.stop_token_ids == (5, 7)
    hash(params)  # lists were converted: the frozen params stay hashable


def test_top_k_minus_one_means_disabled() -> None:
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(top_k=-1) == SamplingParams(top_k=0)


def test_greedy() -> None:
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=0.7, top_k=1).greedy
    assert not SamplingParams(temperature=0.7).greedy
    assert not SamplingParams(temperature=1.0, top_k=2).greedy
    assert not SamplingParams(temperature=1e-3).greedy


def test_frozen() -> None:
    params = SamplingParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.temperature = 0.5  # type: ignore[misc]
