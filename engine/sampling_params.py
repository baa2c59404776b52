"""Per-request sampling parameters, validated once when a request enters the engine."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.errors import InvalidRequestError

# How many alternatives per token a caller may ask for (OpenAI allows 20 for chat).
MAX_LOGPROBS = 20


@dataclass(slots=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature == 0 means greedy. top_k == 0 and top_p == 1 and min_p == 0 switch those filters off.
    repetition_penalty follows Hugging Face (divides positive logits of seen tokens, prompt included);
    presence and frequency penalties follow OpenAI (subtracted, counting generated tokens only).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # Number of top alternatives returned with each token's logprob; None returns no logprobs at all.
    logprobs: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self) -> None:
        """Raise InvalidRequestError naming the first bad field; accepts only what the sampler can honour."""
        _check_int("max_tokens", self.max_tokens, minimum=1)
        _check_number("temperature", self.temperature)
        if self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        _check_int("top_k", self.top_k, minimum=0)
        _check_number("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_number("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)
        _check_number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise InvalidRequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_number(name, value)
            if not -2.0 <= value <= 2.0:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {value}")
        self.stop = _string_list("stop", self.stop)
        if any(s == "" for s in self.stop):
            raise InvalidRequestError("stop strings must not be empty")
        if not isinstance(self.stop_token_ids, Sequence) or isinstance(self.stop_token_ids, str | bytes):
            raise InvalidRequestError(
                f"stop_token_ids must be a list of integers, got {type(self.stop_token_ids).__name__}"
            )
        self.stop_token_ids = list(self.stop_token_ids)
        for token_id in self.stop_token_ids:
            _check_int("stop_token_ids[]", token_id, minimum=0)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, minimum=0)
            if self.logprobs > MAX_LOGPROBS:
                raise InvalidRequestError(f"logprobs must be <= {MAX_LOGPROBS}, got {self.logprobs}")


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise InvalidRequestError(f"{name} must be >= {minimum}, got {value}")


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError(f"{name} must be a number, got {type(value).__name__}")
    if value != value:  # NaN
        raise InvalidRequestError(f"{name} must not be NaN")


def _string_list(name: str, value: object) -> list[str]:
    """Accept one string or a list of strings (OpenAI's `stop` takes both); reject anything else by type."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple) and all(isinstance(s, str) for s in value):
        return list(value)
    raise InvalidRequestError(f"{name} must be a string or a list of strings, got {type(value).__name__}")
