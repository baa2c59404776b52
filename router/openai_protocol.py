"""OpenAI's completions and chat-completions requests, parsed into what the router's Generate streams need.

Parsing validates every field by type and range and raises HttpError with OpenAI's error shape, naming the field.
vLLM's extensions that load testers and evaluation harnesses rely on (`ignore_eos`, `top_k`, `min_p`,
`repetition_penalty`, `stop_token_ids`, `prompt_logprobs`, `guided_json`, `guided_regex`, `guided_choice`,
`guided_grammar`) are honoured too, as is `response_format` (at most one output constraint per request); any field
not honoured is a 400 naming it (router/openai_fields.py). A completions request may carry a batch of prompts
(strings or token-id lists): each prompt becomes `best_of` Generate streams (`n` unless best_of is set), answered as
choices prompt-major, as OpenAI indexes them. `echo` returns the prompt before the completion, with the prompt's own logprobs when `logprobs` is
set; `max_tokens: 0` with echo scores a prompt without generating (lm-evaluation-harness's loglikelihood requests).
A chat request may offer `tools` (router/tool_calls.py): they are rendered into the prompt, and a forced call
(`tool_choice` required or named) becomes the request's output constraint.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from cluster.sampling_proto import structured_to_proto
from engine import limits
from engine.errors import InvalidRequestError
from router.chat_messages import template_messages
from router.http_error import HttpError
from router.openai_fields import UnsupportedField, check_fields
from router.openai_values import (
    assign,
    read_bool,
    read_int,
    read_logit_bias,
    read_logprobs,
    read_number,
    read_prompt_logprobs,
    read_stop,
    read_stop_token_ids,
    read_structured_output,
)
from router.prompt_encoder import EncoderBusy, PromptEncoder, PromptTooLong
from router.tool_calls import ToolPlan, read_tool_plan
from router.tool_parsers import ToolFormat
from splitserve.v1 import inference_pb2 as pb

MAX_N = 16
MAX_STREAMS = 64  # Generate streams one HTTP request may start: prompts x best_of
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for completions


@dataclass
class ParsedRequest:
    chat: bool
    prompts: list[list[int]]
    prompt_texts: list[
        str | None
    ]  # each prompt as given, for echo; None: given as token ids (echo decodes them)
    sampling: pb.SamplingParameters
    n: int  # choices returned per prompt
    best_of: (
        int  # candidates generated per prompt (>= n); the n with the highest cumulative logprob are returned
    )
    stream: bool
    include_usage: bool
    logprobs: int | None  # alternatives per token; None: no logprobs
    echo: bool = False
    echo_only: bool = False  # max_tokens 0 with echo: the prompt is scored, nothing generated is returned
    prompt_logprobs: int | None = None  # vLLM's choices[].prompt_logprobs
    tools: ToolPlan | None = None  # chat with tools (router/tool_calls.py); None: plain text answers
    tool_format: ToolFormat | None = None  # how the model writes calls, for tool_choice auto
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def streams(self) -> int:
        return len(self.prompts) * self.best_of

    def prompt_of(self, stream: int) -> int:
        return stream // self.best_of


async def parse_request(
    body: object,
    *,
    chat: bool,
    encoder: PromptEncoder,
    model_name: str,
    max_model_len: int,
    vocab_size: int,
    tool_format: ToolFormat | None = None,
) -> ParsedRequest:
    """The request's fields, validated, with its prompts tokenized off the event loop (router/prompt_encoder.py).

    tool_format: how the served model writes tool calls (router/tool_parsers.py); None when its chat template
    renders no tools, which makes tool_choice auto a 400."""  # fmt: skip
    if not isinstance(body, dict):
        raise HttpError(400, "the request body must be a JSON object")
    try:
        check_fields(body, "chat" if chat else "completions")
    except UnsupportedField as exc:
        raise HttpError(400, str(exc), param=exc.name) from None
    model = body.get("model")
    if not isinstance(model, str):
        raise HttpError(400, "model must be a string", param="model")
    if model != model_name:
        raise HttpError(
            404, f"the model {model!r} does not exist (served: {model_name!r})", code="model_not_found"
        )
    n = read_int(body, "n", 1) or 1
    if n > MAX_N:
        raise HttpError(400, f"n must be <= {MAX_N}", param="n")
    best_of = _best_of(body, n)
    texts: list[str | None]
    tools = _tool_plan(body, tool_format) if chat else None
    if chat:
        prompts, texts = [await _chat_prompt(body, encoder, max_model_len, tools)], [None]
    else:
        prompts, texts = await _completion_prompts(body, encoder, max_model_len)
    if len(prompts) * best_of > MAX_STREAMS:
        raise HttpError(
            400,
            f"{len(prompts)} prompts x {best_of} choices is more than {MAX_STREAMS} completions in one request",
            param="prompt" if len(prompts) > 1 else "n",
        )
    echo = read_bool(body, "echo")
    logprobs = read_logprobs(body, chat)
    prompt_logprobs = read_prompt_logprobs(body)
    sampling = _sampling(body, chat, max(len(p) for p in prompts), max_model_len, vocab_size, echo)
    if tools is not None:
        _force_tool_call(sampling, tools, body)
    if logprobs is not None or best_of > n:
        # best_of ranks candidates by their cumulative logprob, so it needs the sampled tokens' logprobs.
        assign(sampling, "logprobs", logprobs or 0, "top_logprobs" if chat else "logprobs")
    wanted_prompt_logprobs = [k for k in (prompt_logprobs, logprobs if echo else None) if k is not None]
    if wanted_prompt_logprobs:
        sampling.prompt_logprobs = max(wanted_prompt_logprobs)
    stream = read_bool(body, "stream")
    if stream and best_of > n:
        raise HttpError(400, "best_of cannot be used with stream", param="best_of")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise HttpError(400, "stream_options must be an object", param="stream_options")
    return ParsedRequest(
        chat=chat,
        prompts=prompts,
        prompt_texts=texts,
        sampling=sampling,
        n=n,
        best_of=best_of,
        stream=stream,
        include_usage=bool(options and options.get("include_usage")),
        logprobs=logprobs,
        echo=echo,
        echo_only=echo and body.get("max_tokens") == 0,
        prompt_logprobs=prompt_logprobs,
        tools=tools,
        tool_format=tool_format,
    )


def _force_tool_call(sampling: pb.SamplingParameters, tools: ToolPlan, body: dict[str, Any]) -> None:
    """tool_choice required or named: a JSON schema makes the output a valid call (router/tool_calls.py)."""
    forcing = tools.constraint()
    if forcing is None:
        return
    if sampling.HasField("structured_output"):
        raise HttpError(400, f"tool_choice {body['tool_choice']!r} cannot be combined with an output constraint "
                        "(response_format or guided_*)", param="tool_choice")  # fmt: skip
    try:
        forcing.validate()  # within the engine's limits on constraints
    except InvalidRequestError as exc:
        raise HttpError(400, f"tools: the schema forcing the call is refused: {exc}", param="tools") from None
    sampling.structured_output.CopyFrom(structured_to_proto(forcing))


def _tool_plan(body: dict[str, Any], tool_format: ToolFormat | None) -> ToolPlan | None:
    plan = read_tool_plan(body)
    if plan is not None and not plan.forced and tool_format is None:
        raise HttpError(
            400,
            "this model's chat template does not show tools to the model, so it cannot choose a call (tool_choice "
            '"auto"); send tool_choice "required" or a named function, which force a call',
            param="tools",
        )
    return plan


def _best_of(body: dict[str, Any], n: int) -> int:
    best_of = read_int(body, "best_of", 1)
    if best_of is None:
        return n
    if best_of < n:
        raise HttpError(400, f"best_of must be >= n ({n}), got {best_of}", param="best_of")
    if best_of > MAX_N:
        raise HttpError(400, f"best_of must be <= {MAX_N}", param="best_of")
    return best_of


def _sampling(
    body: dict[str, Any], chat: bool, longest_prompt: int, max_model_len: int, vocab_size: int, echo: bool
) -> pb.SamplingParameters:
    sampling = pb.SamplingParameters()
    room = max_model_len - longest_prompt
    max_param = (
        "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    )
    # max_tokens 0 asks for nothing generated: meaningful only with echo (the prompt is scored, one token is computed
    # and dropped, since a request always yields at least one token).
    max_tokens = read_int(body, max_param, 0 if echo else 1)
    if max_tokens is not None and max_tokens > room:
        raise HttpError(
            400,
            f"{max_param} is too large: the longest prompt has {longest_prompt} tokens and {max_param} asks for "
            f"{max_tokens} more, beyond this model's context of {max_model_len} tokens",
            param=max_param,
        )
    # Unset: OpenAI's 16 for completions (less when the context has no room for 16), the rest of the context for chat.
    default = room if chat else min(DEFAULT_COMPLETION_TOKENS, room)
    assign(sampling, "max_tokens", max(max_tokens if max_tokens is not None else default, 1), max_param)
    # The engine's bounds (engine/limits.py); the router's check (router/sampling_check.py) adds the rest, such as
    # temperature's gap between 0 and its minimum.
    for name, low, high in (("temperature", 0.0, limits.MAX_TEMPERATURE), ("top_p", 1e-9, 1.0), ("min_p", 0.0, 1.0),
                            ("presence_penalty", -limits.MAX_ABS_PENALTY, limits.MAX_ABS_PENALTY),
                            ("frequency_penalty", -limits.MAX_ABS_PENALTY, limits.MAX_ABS_PENALTY),
                            ("repetition_penalty", limits.MIN_REPETITION_PENALTY, limits.MAX_REPETITION_PENALTY),
                            ):  # fmt: skip
        value = read_number(body, name, low, high)
        if value is not None:
            assign(sampling, name, value)
    for name in ("seed", "top_k"):
        count = read_int(body, name, 0)
        if count is not None:
            assign(sampling, name, count)
    sampling.stop.extend(read_stop(body))
    sampling.stop_token_ids.extend(read_stop_token_ids(body, vocab_size))
    sampling.ignore_eos = read_bool(body, "ignore_eos")
    for token, bias in read_logit_bias(body, vocab_size).items():
        sampling.logit_bias[token] = bias
    structured = read_structured_output(body)  # response_format or vLLM's guided_*: compiled by the nodes
    if structured is not None:
        sampling.structured_output.CopyFrom(structured_to_proto(structured))
    return sampling


async def _completion_prompts(
    body: dict[str, Any], encoder: PromptEncoder, max_model_len: int
) -> tuple[list[list[int]], list[str | None]]:
    """The prompts of a completions request: a string, a list of token ids, or a batch (a list of either)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_id(t) for t in prompt)):
        batch: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        batch = prompt
    else:
        raise HttpError(
            400, "prompt must be a string, a list of token ids, or a non-empty list of either", param="prompt"
        )
    if len(batch) > MAX_STREAMS:
        raise HttpError(400, f"at most {MAX_STREAMS} prompts per request", param="prompt")
    prompts, texts = [], []
    for index, item in enumerate(batch):
        where = "prompt" if len(batch) == 1 else f"prompt[{index}]"
        if isinstance(item, str):
            ids = await _encode(encoder, item, max_model_len, "the prompt" if len(batch) == 1 else where)
        elif all(_is_id(t) for t in item):
            ids = list(item)
        else:
            raise HttpError(400, f"{where} must be a string or a list of token ids", param="prompt")
        if not ids:
            raise HttpError(400, f"{where} is empty", param="prompt")
        _check_length(len(ids), max_model_len, "prompt", "the prompt" if len(batch) == 1 else where)
        prompts.append(ids)
        texts.append(item if isinstance(item, str) else None)
    return prompts, texts


async def _encode(encoder: PromptEncoder, text: str, max_model_len: int, where: str) -> list[int]:
    try:
        return await encoder.encode(text, limit=max_model_len)
    except PromptTooLong as exc:  # the encoder stops at the context's length
        raise _too_long(exc.tokens, max_model_len, "prompt", where) from None


async def _chat_prompt(
    body: dict[str, Any], encoder: PromptEncoder, max_model_len: int, tools: ToolPlan | None
) -> list[int]:
    messages = template_messages(body.get("messages"))  # router/chat_messages.py: tool calls and results too
    try:
        ids = await encoder.encode_chat(
            messages, limit=max_model_len, tools=tools.template_tools() if tools else None
        )
    except PromptTooLong as exc:
        raise _too_long(exc.tokens, max_model_len, "messages", "the conversation") from None
    except EncoderBusy:
        raise
    except Exception as exc:  # the model's own template rejected the conversation
        raise HttpError(400, f"messages: {exc}", param="messages") from exc
    _check_length(len(ids), max_model_len, "messages", "the conversation")
    return ids


def _check_length(tokens: int, max_model_len: int, param: str, what: str) -> None:
    if tokens >= max_model_len:
        raise _too_long(tokens, max_model_len, param, what)


def _too_long(tokens: int, max_model_len: int, param: str, what: str) -> HttpError:
    return HttpError(
        400,
        f"{what} has {tokens} tokens; this model's context is {max_model_len} tokens",
        param=param,
        code="context_length_exceeded",
    )


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
