"""Per-request sampling parameters, validated once when a request enters the engine."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from engine import limits
from engine.errors import InvalidRequestError
from engine.structured_spec import StructuredOutput

MAX_LOGPROBS = limits.MAX_LOGPROBS  # kept here too: callers import it from this module


@dataclass(slots=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature == 0 means greedy. top_k == 0 and top_p == 1 and min_p == 0 switch those filters off.
    repetition_penalty follows Hugging Face (divides positive logits of seen tokens, prompt included);
    presence and frequency penalties follow OpenAI (subtracted, counting generated tokens only).
    logit_bias (OpenAI's) is added to the logits before everything else; reported logprobs ignore it.
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
    # Teacher-forced logprobs of the prompt's tokens (each given those before it), with this many alternatives per
    # token; None computes none. Such a request does not reuse prefix-cached blocks: they would have no logits.
    prompt_logprobs: int | None = None
    # token id -> bias added to its logit before penalties and sampling (OpenAI's logit_bias).
    logit_bias: dict[int, float] = field(default_factory=dict)
    # Constrains the output to a JSON schema, regex, choice or grammar (engine/structured_output.py); None: free text.
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self) -> None:
        """Raise InvalidRequestError naming the first bad field; accepts only what the sampler can honour.

        The bounds are engine/limits.py's, shared with the router, so both refuse the same requests."""
        _check_int("max_tokens", self.max_tokens, minimum=1, maximum=limits.MAX_UINT32)
        _check_temperature(self.temperature)
        _check_int("top_k", self.top_k, minimum=0, maximum=limits.MAX_UINT32)
        _check_number("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_number("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0, maximum=limits.MAX_SEED)
        _check_range(
            "repetition_penalty",
            self.repetition_penalty,
            limits.MIN_REPETITION_PENALTY,
            limits.MAX_REPETITION_PENALTY,
        )
        for name in ("presence_penalty", "frequency_penalty"):
            _check_range(name, getattr(self, name), -limits.MAX_ABS_PENALTY, limits.MAX_ABS_PENALTY)
        self.stop = _string_list("stop", self.stop)
        _check_stop_strings(self.stop)
        if not isinstance(self.stop_token_ids, Sequence) or isinstance(self.stop_token_ids, str | bytes):
            raise InvalidRequestError(
                f"stop_token_ids must be a list of integers, got {type(self.stop_token_ids).__name__}"
            )
        if len(self.stop_token_ids) > limits.MAX_STOP_TOKEN_IDS:
            raise InvalidRequestError(
                f"stop_token_ids: at most {limits.MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}"
            )
        self.stop_token_ids = list(self.stop_token_ids)
        for token_id in self.stop_token_ids:
            _check_int("stop_token_ids[]", token_id, minimum=0, maximum=limits.MAX_UINT32)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, minimum=0, maximum=MAX_LOGPROBS)
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, minimum=0, maximum=MAX_LOGPROBS)
        self.logit_bias = _checked_logit_bias(self.logit_bias)
        if self.structured is not None:
            if not isinstance(self.structured, StructuredOutput):
                raise InvalidRequestError(
                    f"structured must be a StructuredOutput, got {type(self.structured).__name__}"
                )
            self.structured.validate()


def _checked_logit_bias(value: object) -> dict[int, float]:
    """A copy of logit_bias with float values; the ids' range against the vocabulary is the intake's to check."""
    if not isinstance(value, Mapping):
        raise InvalidRequestError(
            f"logit_bias must be a mapping of token id to bias, got {type(value).__name__}"
        )
    if len(value) > limits.MAX_LOGIT_BIAS_ENTRIES:
        raise InvalidRequestError(
            f"logit_bias: at most {limits.MAX_LOGIT_BIAS_ENTRIES} entries, got {len(value)}"
        )
    checked: dict[int, float] = {}
    for token_id, bias in value.items():
        _check_int("logit_bias token id", token_id, minimum=0, maximum=limits.MAX_UINT32)
        _check_range(f"logit_bias[{token_id}]", bias, -limits.MAX_ABS_LOGIT_BIAS, limits.MAX_ABS_LOGIT_BIAS)
        checked[token_id] = float(bias)
    return checked


def _check_temperature(value: object) -> None:
    """0 is greedy; a positive temperature below the minimum would overflow the logits it divides."""
    value = _check_number("temperature", value)
    if value < 0:
        raise InvalidRequestError(f"temperature must be >= 0, got {value}")
    if 0 < value < limits.MIN_TEMPERATURE:
        raise InvalidRequestError(
            f"temperature must be 0 (greedy) or at least {limits.MIN_TEMPERATURE:g}, got {value:g}"
        )
    if value > limits.MAX_TEMPERATURE:
        raise InvalidRequestError(f"temperature must be <= {limits.MAX_TEMPERATURE:g}, got {value:g}")


def _check_stop_strings(stops: list[str]) -> None:
    if len(stops) > limits.MAX_STOP_STRINGS:
        raise InvalidRequestError(f"stop: at most {limits.MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    for stop in stops:
        if not stop:
            raise InvalidRequestError("stop strings must not be empty")
        if len(stop) > limits.MAX_STOP_STRING_CHARS:
            raise InvalidRequestError(
                f"stop: a stop string may have at most {limits.MAX_STOP_STRING_CHARS} characters, "
                f"got {len(stop)}"
            )


def _check_range(name: str, value: object, low: float, high: float) -> None:
    value = _check_number(name, value)
    if not low <= value <= high:
        raise InvalidRequestError(f"{name} must be in [{low:g}, {high:g}], got {value:g}")


def _check_int(name: str, value: object, *, minimum: int, maximum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise InvalidRequestError(f"{name} must be >= {minimum}, got {value}")
    if value > maximum:
        raise InvalidRequestError(f"{name} must be <= {maximum}, got {value}")


def _check_number(name: str, value: object) -> float:
    """value as a float if it is a finite number (not a bool); InvalidRequestError naming the field otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError(f"{name} must be a number, got {type(value).__name__}")
    if value != value:  # NaN
        raise InvalidRequestError(f"{name} must not be NaN")
    if value in (float("inf"), float("-inf")):
        raise InvalidRequestError(f"{name} must be finite, got {value}")
    return float(value)


def _string_list(name: str, value: object) -> list[str]:
    """Accept one string or a list of strings (OpenAI's `stop` takes both); reject anything else by type."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple) and all(isinstance(s, str) for s in value):
        return list(value)
    raise InvalidRequestError(f"{name} must be a string or a list of strings, got {type(value).__name__}")
