"""The shared sampling limits (engine/limits.py): the engine refuses what would break the sampler, and the sampler
never turns an extreme but accepted value into NaN, inf or an overflow."""

from __future__ import annotations

import pytest
import torch

from engine import limits
from engine.errors import InvalidRequestError
from engine.sampler import generator_seed, sample
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"temperature": 1e-40}, "temperature must be 0 (greedy) or at least 0.01"),
        ({"temperature": 0.009}, "temperature must be 0 (greedy) or at least 0.01"),
        ({"temperature": 2.5}, "temperature must be <= 2"),
        ({"temperature": float("inf")}, "temperature must be finite"),
        ({"repetition_penalty": 1.4e-45}, "repetition_penalty must be in [0.01, 100]"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty must be finite"),
        ({"repetition_penalty": 101.0}, "repetition_penalty must be in [0.01, 100]"),
        ({"frequency_penalty": float("-inf")}, "frequency_penalty must be finite"),
        ({"top_p": float("nan")}, "top_p must not be NaN"),
        ({"min_p": float("inf")}, "min_p must be finite"),
        ({"seed": 2**64}, "seed must be <= 18446744073709551615"),
        ({"max_tokens": 2**32}, "max_tokens must be <= 4294967295"),
        ({"top_k": 2**32}, "top_k must be <= 4294967295"),
        ({"stop": ["x"] * 10_000}, "stop: at most 16 stop strings, got 10000"),
        ({"stop": ["x" * 1_000_000]}, "stop: a stop string may have at most 1000 characters"),
        ({"stop_token_ids": list(range(100_000))}, "stop_token_ids: at most 1024 ids, got 100000"),
        ({"stop_token_ids": [2**32]}, "stop_token_ids[] must be <= 4294967295"),
    ],
)
def test_values_past_the_limits_are_refused_naming_the_field(kwargs: dict, fragment: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs)
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0.0},
        {"temperature": limits.MIN_TEMPERATURE},
        {"temperature": limits.MAX_TEMPERATURE},
        {"repetition_penalty": limits.MIN_REPETITION_PENALTY},
        {"repetition_penalty": limits.MAX_REPETITION_PENALTY},
        {"seed": 0},
        {"seed": 2**63},
        {"seed": limits.MAX_SEED},
        {"stop": ["x" * limits.MAX_STOP_STRING_CHARS] * limits.MAX_STOP_STRINGS},
        {"stop_token_ids": list(range(limits.MAX_STOP_TOKEN_IDS))},
    ],
)
def test_values_at_the_limits_are_accepted(kwargs: dict) -> None:
    SamplingParams(**kwargs)


def one_row(params: SamplingParams, logits: torch.Tensor, outputs: int = 0) -> int:
    seq = Sequence("r", [0, 1, 2], params, detokenizer=None)
    seq.output_token_ids.extend([1] * outputs)
    return sample(logits[None, :], [seq], torch.Generator().manual_seed(0))[0].token_id


@pytest.mark.parametrize("seed", [18_400_000_000_000, 2**63 - 1, 2**63, 2**64 - 1])
def test_huge_seeds_draw_deterministically(seed: int) -> None:
    logits = torch.randn(200, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.0, seed=seed)
    draws = [one_row(params, logits, outputs=i) for i in range(8)]
    assert draws == [one_row(params, logits, outputs=i) for i in range(8)]
    assert all(0 <= t < 200 for t in draws)


def test_generator_seed_is_unchanged_below_the_old_overflow_and_wraps_above() -> None:
    assert generator_seed(42, 3) == 42 * 1_000_003 + 3  # seeded outputs made before this change stay the same
    assert generator_seed(2**64 - 1, 0) == (2**64 - 1) * 1_000_003 % 2**64
    assert 0 <= generator_seed(2**64 - 1, 10**6) < 2**64


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 1e-3])
def test_tiny_temperatures_reaching_the_sampler_behave_as_greedy(temperature: float) -> None:
    """Validation refuses them; the sampler still copes, so a missed check cannot produce NaN probabilities."""
    logits = torch.tensor([1.0, 3.0, 2.99, -5.0])
    params = SamplingParams(temperature=1.0, seed=7)
    params.temperature = temperature  # past validation
    assert {one_row(params, logits, outputs=i) for i in range(10)} == {1}


def test_large_logits_with_the_strongest_penalty_stay_finite() -> None:
    logits = torch.tensor([3e4, -3e4, 1.0, 2.0])
    params = SamplingParams(
        temperature=limits.MIN_TEMPERATURE, repetition_penalty=limits.MIN_REPETITION_PENALTY
    )
    token = one_row(params, logits)  # prompt [0, 1, 2] is penalised: 3e4 / 0.01 stays far below fp32's max
    assert token == 0
