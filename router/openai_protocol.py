"""OpenAI's completions and chat-completions requests and responses, mapped onto splitserve's Generate.

Parsing validates every field by type and range and raises HttpError with OpenAI's error shape, naming the field.
Extensions that load testers rely on (vLLM's `ignore_eos`, `top_k`, `min_p`, `repetition_penalty`) are accepted too.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from engine import limits
from router.errors import RouterError
from router.prompt_encoder import EncoderBusy, PromptEncoder, PromptTooLong
from splitserve.v1 import inference_pb2 as pb

MAX_N = 16
MAX_STOP_STRINGS = limits.MAX_STOP_STRINGS
FINISH_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
}
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class HttpError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
        code: str | None = None, close: bool = False,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.close = close  # end the connection after answering (the rest of the body was never read)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def from_router(cls, exc: RouterError) -> HttpError:
        status = _HTTP_STATUS.get(exc.code, 500)
        code = "context_length_exceeded" if exc.too_long else "model_not_found" if status == 404 else None
        kind = "invalid_request_error" if status < 500 else "server_error"
        return cls(status, exc.message, type_=kind, code=code)


@dataclass
class ParsedRequest:
    chat: bool
    prompt: list[int]
    sampling: pb.SamplingParameters
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None  # alternatives per token; None: no logprobs
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))


def usage_charges(usages: Sequence[pb.Usage]) -> dict[str, Any]:
    """splitserve's fields of an OpenAI usage object: energy and cost, summed over the choices' requests.

    `charges` splits them by phase (and gives the machine seconds behind the costs); `power_source` is "measured",
    "modeled", "mixed" (nodes of both kinds) or None when no node charged anything."""
    fields = [f.name for f in pb.ChargeBreakdown.DESCRIPTOR.fields if f.type == f.TYPE_DOUBLE]
    charges: dict[str, Any] = {name: sum(getattr(u.charges, name) for u in usages) for name in fields}
    sources = {u.charges.power_source for u in usages if u.charges.power_source}
    charges["power_source"] = sources.pop() if len(sources) == 1 else "mixed" if sources else None
    return {
        "energy_joules": sum(u.energy_joules for u in usages),
        "cost_usd": sum(u.cost_usd for u in usages),
        "charges": charges,
    }


async def parse_request(
    body: object, *, chat: bool, encoder: PromptEncoder, model_name: str, max_model_len: int
) -> ParsedRequest:
    """The request's fields, validated, with its prompt tokenized off the event loop (router/prompt_encoder.py)."""
    if not isinstance(body, dict):
        raise HttpError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise HttpError(400, "model must be a string", param="model")
    if model != model_name:
        raise HttpError(
            404, f"the model {model!r} does not exist (served: {model_name!r})", code="model_not_found"
        )
    param = "messages" if chat else "prompt"
    try:
        prompt = await (
            _chat_prompt(body, encoder, max_model_len)
            if chat
            else _completion_prompt(body, encoder, max_model_len)
        )
    except PromptTooLong as exc:
        prompt_tokens = exc.tokens
    else:
        prompt_tokens = len(prompt)
    if prompt_tokens >= max_model_len:
        raise HttpError(
            400,
            f"the prompt has {prompt_tokens} tokens; this model's context is {max_model_len} tokens",
            param=param,
            code="context_length_exceeded",
        )
    sampling = pb.SamplingParameters()
    default_max = 16 if not chat else max_model_len - len(prompt)
    max_tokens = _int(body, "max_completion_tokens", 1) if chat else None
    max_param = "max_completion_tokens" if max_tokens else "max_tokens"
    _assign(sampling, "max_tokens", max_tokens or _int(body, "max_tokens", 1) or default_max, max_param)
    # The engine's bounds (engine/limits.py); the router's check (router/sampling_check.py) adds the rest, such as
    # temperature's gap between 0 and its minimum.
    for name, low, high in (("temperature", 0.0, limits.MAX_TEMPERATURE), ("top_p", 1e-9, 1.0), ("min_p", 0.0, 1.0),
                            ("presence_penalty", -limits.MAX_ABS_PENALTY, limits.MAX_ABS_PENALTY),
                            ("frequency_penalty", -limits.MAX_ABS_PENALTY, limits.MAX_ABS_PENALTY),
                            ("repetition_penalty", limits.MIN_REPETITION_PENALTY, limits.MAX_REPETITION_PENALTY),
                            ):  # fmt: skip
        value = _number(body, name, low, high)
        if value is not None:
            _assign(sampling, name, value)
    for name in ("seed", "top_k"):
        value = _int(body, name, 0)
        if value is not None:
            _assign(sampling, name, value)
    sampling.stop.extend(_stop(body))
    sampling.ignore_eos = _bool(body, "ignore_eos")
    logprobs = _logprobs(body, chat)
    if logprobs is not None:
        _assign(sampling, "logprobs", logprobs, "top_logprobs" if chat else "logprobs")
    n = _int(body, "n", 1) or 1
    if n > MAX_N:
        raise HttpError(400, f"n must be <= {MAX_N}", param="n")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise HttpError(400, "stream_options must be an object", param="stream_options")
    return ParsedRequest(
        chat=chat,
        prompt=prompt,
        sampling=sampling,
        n=n,
        stream=_bool(body, "stream"),
        include_usage=bool(options and options.get("include_usage")),
        logprobs=logprobs,
    )


async def _completion_prompt(body: dict[str, Any], encoder: PromptEncoder, max_model_len: int) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = await encoder.encode(prompt, limit=max_model_len)
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
    elif isinstance(prompt, list):
        raise HttpError(400, "only one prompt per request is supported", param="prompt")
    else:
        raise HttpError(400, "prompt must be a string or a list of token ids", param="prompt")
    if not ids:
        raise HttpError(400, "prompt is empty", param="prompt")
    return ids


async def _chat_prompt(body: dict[str, Any], encoder: PromptEncoder, max_model_len: int) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise HttpError(400, "messages must be a non-empty list", param="messages")
    normalised = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise HttpError(400, f"messages[{i}] must be an object with a role", param="messages")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text is supported
            texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            strings = [t for t in texts if isinstance(t, str)]
            if len(strings) != len(content):
                raise HttpError(
                    400, f"messages[{i}].content: only text parts are supported", param="messages"
                )
            content = "".join(strings)
        if not isinstance(content, str):
            raise HttpError(400, f"messages[{i}].content must be a string", param="messages")
        normalised.append({"role": message["role"], "content": content})
    try:
        return await encoder.encode_chat(normalised, limit=max_model_len)
    except (PromptTooLong, EncoderBusy):
        raise
    except Exception as exc:  # the model's own template rejected the conversation
        raise HttpError(400, f"messages: {exc}", param="messages") from exc


def _assign(sampling: pb.SamplingParameters, name: str, value: float, param: str | None = None) -> None:
    """Set a protobuf field; a value its wire type cannot hold (over 2**32 - 1 for uint32, ...) is a 400, not a 500."""
    try:
        setattr(sampling, name, value)
    except (ValueError, TypeError, OverflowError):
        shown = str(value) if len(str(value)) <= 40 else f"{str(value)[:20]}...({len(str(value))} digits)"
        raise HttpError(400, f"{param or name} is out of range: {shown}", param=param or name) from None


def _int(body: dict[str, Any], name: str, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise HttpError(400, f"{name} must be an integer", param=name)
    if value < minimum:
        raise HttpError(400, f"{name} must be >= {minimum}, got {value}", param=name)
    return value


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise HttpError(400, f"{name} must be a number", param=name)
    if not low <= value <= high:
        raise HttpError(400, f"{name} must be between {low:g} and {high:g}, got {value}", param=name)
    return float(value)


def _bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise HttpError(400, f"{name} must be a boolean", param=name)
    return value


def _stop(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise HttpError(400, "stop must be a non-empty string or a list of them", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise HttpError(400, f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
    return stops


def _logprobs(body: dict[str, Any], chat: bool) -> int | None:
    if chat:
        if not _bool(body, "logprobs"):
            if body.get("top_logprobs") is not None:
                raise HttpError(400, "top_logprobs requires logprobs: true", param="top_logprobs")
            return None
        top = _int(body, "top_logprobs", 0) or 0
    else:
        top = _int(body, "logprobs", 0)  # type: ignore[assignment]
        if top is None:
            return None
    if top > 20:
        raise HttpError(400, "at most 20 top logprobs", param="top_logprobs" if chat else "logprobs")
    return top
