"""Sampling parameters reject bad values with a message naming the field."""

from __future__ import annotations

import pytest

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"max_tokens": 2.5}, "max_tokens must be an integer"),
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"min_p": 2.0}, "min_p must be in [0, 1]"),
        ({"stop": 5}, "stop must be a string or a list of strings"),
        ({"stop": ["ok", 3]}, "stop must be a string or a list of strings"),
        ({"stop": [""]}, "stop strings must not be empty"),
        ({"stop_token_ids": [-1]}, "stop_token_ids[] must be >= 0"),
        ({"logprobs": 21}, "logprobs must be <= 20"),
        ({"presence_penalty": 3}, "presence_penalty must be in [-2, 2]"),
        ({"repetition_penalty": 0}, "repetition_penalty must be in [0.01, 100]"),
        ({"temperature": float("nan")}, "temperature must not be NaN"),
        ({"seed": -4}, "seed must be >= 0"),
    ],
)
def test_bad_values_are_rejected_with_the_field_named(kwargs: dict, fragment: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs)
    assert fragment in str(err.value)


def test_single_stop_string_becomes_a_list() -> None:
    assert SamplingParams(stop="###").stop == ["###"]


def test_defaults_are_valid() -> None:
    params = SamplingParams()
    assert not params.greedy and not params.has_penalties
