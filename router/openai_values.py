"""Typed readers of an OpenAI request body's values: each returns the value (None when absent) or raises a 400
naming the field."""

from __future__ import annotations

import json
from typing import Any

from engine import limits
from engine.errors import InvalidRequestError
from engine.structured_spec import StructuredKind, StructuredOutput
from router.http_error import HttpError
from splitserve.v1 import inference_pb2 as pb

MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS_ENTRIES = limits.MAX_LOGIT_BIAS_ENTRIES
MAX_ABS_LOGIT_BIAS = limits.MAX_ABS_LOGIT_BIAS


def assign(sampling: pb.SamplingParameters, name: str, value: float, param: str | None = None) -> None:
    """Set a protobuf field; a value its wire type cannot hold (over 2**32 - 1 for uint32, ...) is a 400, not a 500."""
    try:
        setattr(sampling, name, value)
    except (ValueError, TypeError, OverflowError):
        shown = str(value) if len(str(value)) <= 40 else f"{str(value)[:20]}...({len(str(value))} digits)"
        raise HttpError(400, f"{param or name} is out of range: {shown}", param=param or name) from None


def read_int(body: dict[str, Any], name: str, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise HttpError(400, f"{name} must be an integer", param=name)
    if value < minimum:
        raise HttpError(400, f"{name} must be >= {minimum}, got {value}", param=name)
    return value


def read_number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise HttpError(400, f"{name} must be a number", param=name)
    if not low <= value <= high:
        raise HttpError(400, f"{name} must be between {low:g} and {high:g}, got {value}", param=name)
    return float(value)


def read_bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise HttpError(400, f"{name} must be a boolean", param=name)
    return value


def read_stop(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise HttpError(400, "stop must be a non-empty string or a list of them", param="stop")
    if len(stops) > limits.MAX_STOP_STRINGS:
        raise HttpError(400, f"at most {limits.MAX_STOP_STRINGS} stop strings", param="stop")
    return stops


def read_stop_token_ids(body: dict[str, Any], vocab_size: int) -> list[int]:
    ids = body.get("stop_token_ids")
    if ids is None:
        return []
    if not isinstance(ids, list) or not all(_is_token_id(i, vocab_size) for i in ids):
        raise HttpError(
            400, f"stop_token_ids must be a list of token ids in [0, {vocab_size})", param="stop_token_ids"
        )
    if len(ids) > limits.MAX_STOP_TOKEN_IDS:
        raise HttpError(400, f"at most {limits.MAX_STOP_TOKEN_IDS} stop_token_ids", param="stop_token_ids")
    return ids


def read_logprobs(body: dict[str, Any], chat: bool) -> int | None:
    """Alternatives per output token: completions' `logprobs` count, or chat's `logprobs` + `top_logprobs`."""
    if chat:
        if not read_bool(body, "logprobs"):
            if body.get("top_logprobs") is not None:
                raise HttpError(400, "top_logprobs requires logprobs: true", param="top_logprobs")
            return None
        top = read_int(body, "top_logprobs", 0) or 0
    else:
        count = read_int(body, "logprobs", 0)
        if count is None:
            return None
        top = count
    if top > MAX_TOP_LOGPROBS:
        raise HttpError(
            400, f"at most {MAX_TOP_LOGPROBS} top logprobs", param="top_logprobs" if chat else "logprobs"
        )
    return top


def read_prompt_logprobs(body: dict[str, Any]) -> int | None:
    """vLLM's `prompt_logprobs`: alternatives per prompt token (0..20)."""
    count = read_int(body, "prompt_logprobs", 0)
    if count is not None and count > MAX_TOP_LOGPROBS:
        raise HttpError(400, f"prompt_logprobs must be <= {MAX_TOP_LOGPROBS}", param="prompt_logprobs")
    return count


def read_logit_bias(body: dict[str, Any], vocab_size: int) -> dict[int, float]:
    """OpenAI's `logit_bias`: {"<token id>": bias in [-100, 100]}, at most 300 entries."""
    bias = body.get("logit_bias")
    if bias is None:
        return {}
    if not isinstance(bias, dict):
        raise HttpError(400, "logit_bias must be an object of token id -> bias", param="logit_bias")
    if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise HttpError(
            400, f"logit_bias may have at most {MAX_LOGIT_BIAS_ENTRIES} entries", param="logit_bias"
        )
    out: dict[int, float] = {}
    for key, value in bias.items():
        token = int(key) if isinstance(key, str) and key.isdigit() else -1
        if not _is_token_id(token, vocab_size):
            raise HttpError(
                400, f"logit_bias: {key!r} is not a token id in [0, {vocab_size})", param="logit_bias"
            )
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not abs(value) <= MAX_ABS_LOGIT_BIAS
        ):
            raise HttpError(
                400, f"logit_bias[{key!r}] must be a number in [-100, 100], got {value!r}", param="logit_bias"
            )
        out[token] = float(value)
    return out


def _is_token_id(value: object, vocab_size: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab_size


# vLLM's guided-decoding fields and the constraint kind each asks for; response_format is OpenAI's.
_GUIDED_FIELDS = (
    ("guided_json", StructuredKind.JSON_SCHEMA),
    ("guided_regex", StructuredKind.REGEX),
    ("guided_choice", StructuredKind.CHOICE),
    ("guided_grammar", StructuredKind.GRAMMAR),
)


def read_structured_output(body: dict[str, Any]) -> StructuredOutput | None:
    """The output constraint of `response_format` or one of vLLM's `guided_*` fields; at most one may be set."""
    found: list[tuple[str, StructuredOutput]] = []
    response_format = _read_response_format(body.get("response_format"))
    if response_format is not None:
        found.append(("response_format", response_format))
    for name, kind in _GUIDED_FIELDS:
        if body.get(name) is not None:
            found.append((name, _read_guided(name, kind, body[name])))
    if len(found) > 1:
        first, second = found[0][0], found[1][0]
        raise HttpError(
            400, f"{second} cannot be combined with {first}: send one output constraint", param=second
        )
    if not found:
        return None
    name, spec = found[0]
    try:
        spec.validate()
    except InvalidRequestError as exc:
        raise HttpError(400, f"{name}: {exc}", param=name) from None
    return spec


def _read_response_format(value: object) -> StructuredOutput | None:
    param = "response_format"
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise HttpError(400, 'response_format must be an object with a "type"', param=param)
    kind, extra = value["type"], set(value) - {"type"}
    if kind == "text" and not extra:
        return None
    if kind == "json_object" and not extra:
        return StructuredOutput(StructuredKind.JSON_OBJECT)
    if kind == "json_schema" and extra == {"json_schema"}:
        return StructuredOutput(StructuredKind.JSON_SCHEMA, text=_read_json_schema(value["json_schema"]))
    if kind in ("text", "json_object", "json_schema"):
        expected = '"json_schema"' if kind == "json_schema" else "no other field"
        raise HttpError(400, f"response_format of type {kind!r} takes {expected}", param=param)
    raise HttpError(
        400, f'response_format type must be "text", "json_object" or "json_schema", got {kind!r}', param=param
    )


def _read_json_schema(value: object) -> str:
    """OpenAI's response_format.json_schema: {"name", "schema", "description"?, "strict"?}; the schema as JSON text.

    `strict: false` asks OpenAI for best effort; the schema is enforced either way."""
    param = "response_format"
    if not isinstance(value, dict):
        raise HttpError(400, "response_format.json_schema must be an object", param=param)
    unknown = set(value) - {"name", "schema", "description", "strict"}
    if unknown:
        raise HttpError(
            400, f"response_format.json_schema: unknown field {sorted(unknown)[0]!r}", param=param
        )
    if not isinstance(value.get("name"), str) or not value["name"]:
        raise HttpError(400, "response_format.json_schema.name must be a non-empty string", param=param)
    if value.get("strict") is not None and not isinstance(value["strict"], bool):
        raise HttpError(400, "response_format.json_schema.strict must be a boolean", param=param)
    schema = value.get("schema")
    if not isinstance(schema, dict):
        raise HttpError(400, "response_format.json_schema.schema must be an object", param=param)
    return json.dumps(schema)


def _read_guided(name: str, kind: StructuredKind, value: object) -> StructuredOutput:
    if kind == StructuredKind.CHOICE:
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise HttpError(400, f"{name} must be a list of strings", param=name)
        return StructuredOutput(kind, choices=tuple(value))
    if kind == StructuredKind.JSON_SCHEMA and isinstance(value, dict):
        return StructuredOutput(kind, text=json.dumps(value))
    if not isinstance(value, str):
        expected = (
            "a JSON schema (an object or its JSON text)" if kind == StructuredKind.JSON_SCHEMA else "a string"
        )
        raise HttpError(400, f"{name} must be {expected}", param=name)
    return StructuredOutput(kind, text=value)
