"""POST /v1/responses: a basic form of OpenAI's Responses API (text in, text out, streamed as typed events).

1. The request's fields are checked against FIELDS: honoured ones are translated into a chat-completions body, every
   other one is accepted only at a value that asks for nothing (`tools: []`, `store: false`, ...) and is otherwise a
   400 naming it. Nothing is stored, so `store: true` and `previous_response_id` are refused.
2. The conversation (`instructions` as a system message first, then `input`: a string or a list of message items)
   goes through router/openai_protocol.py's chat parsing: the model's chat template, the same sampling checks, the
   same errors (their `param` renamed to this API's field).
3. One Generate stream, in one admission slot, as for a chat completion (router/inference.py).
4. The answer is a `response` object with one assistant message; `status` is "incomplete" (reason
   max_output_tokens) when the output was cut by length. Streaming sends the events the openai SDK parses:
   response.created, response.in_progress, output_item.added, content_part.added, output_text.delta (one per
   message from the nodes), output_text.done, content_part.done, output_item.done, then response.completed (or
   response.incomplete), each as `event: <type>` + `data: <json>` with a sequence_number. An error after the 200 is
   an `error` event.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any, cast

from aiohttp import web

from cluster import tracing
from router.errors import RouterError
from router.http_body import MAX_BODY_BYTES, read_json
from router.http_error import HttpError
from router.inference import InferenceService
from router.openai_fields import (
    NeutralRule,
    UnsupportedField,
    absent,
    absent_or_one_of,
    empty_or_absent,
    false_or_absent,
    refuse_unhonoured,
)
from router.openai_protocol import ParsedRequest, parse_request
from router.openai_responses import StreamResult, usage_charges
from router.sse import open_event_stream, send_event
from splitserve.v1 import inference_pb2 as pb

_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_TEXT_PARTS = {"input_text", "output_text"}
# A field honoured here -> its name in the chat-completions body it is translated to.
_HONOURED = {
    "model": "model",
    "max_output_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "stream": "stream",
    "user": "user",
}
_HANDLED = {"input", "instructions"}  # honoured, turned into the chat messages


def _plain_text(value: Any) -> bool:
    return value is None or value == {} or value == {"format": {"type": "text"}}


# Every other field of OpenAI's Responses request -> (is the value neutral?, what a neutral value looks like).
UNSUPPORTED: Mapping[str, NeutralRule] = {
    "tools": (empty_or_absent, "[]"),
    "tool_choice": (absent_or_one_of("none"), '"none"'),
    "parallel_tool_calls": (absent, "absent"),
    "max_tool_calls": (absent, "null"),
    "text": (_plain_text, '{"format": {"type": "text"}}'),
    "reasoning": (absent, "null"),
    "previous_response_id": (absent, "null"),  # nothing is stored to continue from
    "conversation": (absent, "null"),
    "include": (empty_or_absent, "[]"),
    "truncation": (absent_or_one_of("disabled"), '"disabled"'),
    "store": (false_or_absent, "false"),  # OpenAI's default is true; nothing is stored here
    "background": (false_or_absent, "false"),
    "metadata": (empty_or_absent, "{}"),
    "top_logprobs": (absent_or_one_of(0), "0"),
    "service_tier": (absent_or_one_of("auto", "default"), '"auto" or "default"'),
    "prompt": (absent, "null"),
    "prompt_cache_key": (absent, "null"),
    "prompt_cache_retention": (absent, "null"),
    "safety_identifier": (absent, "null"),
    "stream_options": (empty_or_absent, "{}"),
    "context_management": (empty_or_absent, "[]"),
    "moderation": (absent, "null"),
}


class ResponsesEndpoint:
    def __init__(self, service: InferenceService, body_timeout_s: float) -> None:
        self.service = service
        self.model = service.config.model_name
        self.body_timeout_s = body_timeout_s

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/responses", self.create)

    async def create(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request, MAX_BODY_BYTES, self.body_timeout_s)
        config = self.service.config
        try:
            parsed = await parse_request(
                chat_body(body),
                chat=True,
                encoder=self.service.encoder,
                model_name=self.model,
                max_model_len=config.max_model_len,
                vocab_size=config.vocab_size,
            )
        except HttpError as exc:
            raise _renamed(exc) from None
        prompt = parsed.prompts[0]
        self.service.check_prompt(prompt)
        draft = _Draft(body, self.model, parsed)
        parent = tracing.context_from_metadata([(k.lower(), v) for k, v in request.headers.items()])
        async with self.service.admission.slot(1):
            # generate is an async generator: closing it (however this handler ends) aborts the request on its nodes.
            stream = cast(
                AsyncGenerator[pb.GenerateResponse, None],
                self.service.generate(prompt, parsed.sampling, draft.id, parent),
            )
            async with contextlib.aclosing(stream):
                if parsed.stream:
                    return await self._stream(request, stream, draft)
                result = StreamResult(0)
                async for msg in stream:
                    result.absorb(msg)
                return web.json_response(draft.final(result))

    async def _stream(
        self, request: web.Request, stream: AsyncIterator[pb.GenerateResponse], draft: _Draft
    ) -> web.StreamResponse:
        response, messages = await open_event_stream(request, stream)
        events = _Events(response)
        result = StreamResult(0)
        try:
            for event in draft.opening():
                await events.send(event)
            async for msg in messages:
                result.absorb(msg)
                if msg.text:
                    await events.send(draft.delta(msg.text))
            for event in draft.closing(result):
                await events.send(event)
        except RouterError as exc:  # failed after the 200: an error event, as OpenAI sends
            error = HttpError.from_router(exc)
            await events.send({"type": "error", "code": error.code, "message": error.message, "param": None})
        await response.write_eof()
        return response


def chat_body(body: object) -> dict[str, Any]:
    """The chat-completions body asking for what a Responses request asks for; a 400 for anything unsupported."""
    if not isinstance(body, dict):
        raise HttpError(400, "the request body must be a JSON object")
    try:
        refuse_unhonoured(body, _HONOURED.keys() | _HANDLED, UNSUPPORTED)
    except UnsupportedField as exc:
        raise HttpError(400, str(exc), param=exc.name) from None
    chat = {_HONOURED[name]: value for name, value in body.items() if name in _HONOURED}
    messages = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise HttpError(400, "instructions must be a string", param="instructions")
        messages.append({"role": "system", "content": instructions})
    chat["messages"] = messages + _input_messages(body.get("input"))
    return chat


def _input_messages(value: object) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise HttpError(400, "input must be a string or a non-empty list of message items", param="input")
    return [_message(i, item) for i, item in enumerate(value)]


def _message(index: int, item: object) -> dict[str, str]:
    where = f"input[{index}]"
    if not isinstance(item, dict) or item.get("type", "message") != "message":
        raise HttpError(400, f"{where}: only message items are supported", param="input")
    unknown = set(item) - {"type", "role", "content"}
    if unknown:
        raise HttpError(400, f"{where}: unknown field {sorted(unknown)[0]!r}", param="input")
    role = item.get("role")
    if role not in _ROLES:
        raise HttpError(400, f"{where}.role must be one of {', '.join(_ROLES)}", param="input")
    content = item.get("content")
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") in _TEXT_PARTS]
        strings = [t for t in texts if isinstance(t, str)]
        if len(strings) != len(content):
            raise HttpError(
                400, f"{where}.content: only input_text and output_text parts are supported", param="input"
            )
        content = "".join(strings)
    if not isinstance(content, str):
        raise HttpError(400, f"{where}.content must be a string or a list of text parts", param="input")
    return {"role": _ROLES[role], "content": content}


def _renamed(exc: HttpError) -> HttpError:
    """A chat-parsing error, named with this API's fields (max_tokens -> max_output_tokens, messages -> input)."""
    names = {"max_tokens": "max_output_tokens", "messages": "input"}
    if exc.param not in names:
        return exc
    param = names[exc.param]
    message = exc.message.replace(exc.param, param)
    return HttpError(exc.status, message, type_=exc.type, param=param, code=exc.code)


class _Draft:
    """The response object of one request, built as its output arrives."""

    def __init__(self, body: dict[str, Any], model: str, parsed: ParsedRequest) -> None:
        self.id = f"resp_{uuid.uuid4().hex}"
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self.model = model
        self.body = body
        self.input_tokens = len(parsed.prompts[0])

    def opening(self) -> list[dict[str, Any]]:
        item = self._message("in_progress", [])
        return [
            {"type": "response.created", "response": self._response("in_progress", [], None)},
            {"type": "response.in_progress", "response": self._response("in_progress", [], None)},
            {"type": "response.output_item.added", "output_index": 0, "item": item},
            {**self._where(), "type": "response.content_part.added", "part": _text_part("")},
        ]

    def delta(self, text: str) -> dict[str, Any]:
        return {**self._where(), "type": "response.output_text.delta", "delta": text, "logprobs": []}

    def closing(self, result: StreamResult) -> list[dict[str, Any]]:
        text = "".join(result.text)
        final = self.final(result)
        return [
            {**self._where(), "type": "response.output_text.done", "text": text, "logprobs": []},
            {**self._where(), "type": "response.content_part.done", "part": _text_part(text)},
            {"type": "response.output_item.done", "output_index": 0, "item": final["output"][0]},
            {"type": f"response.{final['status']}", "response": final},
        ]

    def final(self, result: StreamResult) -> dict[str, Any]:
        status = "incomplete" if result.finish_reason == "length" else "completed"
        output = [self._message(status, [_text_part("".join(result.text))])]
        return self._response(status, output, self._usage(result))

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.message_id, "output_index": 0, "content_index": 0}

    def _message(self, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def _usage(self, result: StreamResult) -> dict[str, Any]:
        usages = [result.usage] if result.usage else []
        cached = result.usage.cached_prompt_tokens if result.usage else 0
        return {
            "input_tokens": self.input_tokens,
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": result.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.input_tokens + result.completion_tokens,
            **usage_charges(usages),  # splitserve's energy and cost, as on the other endpoints
        }

    def _response(
        self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None
    ) -> dict[str, Any]:
        body = self.body
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": self.model,
            "output": output,
            "parallel_tool_calls": False,
            "previous_response_id": None,
            "reasoning": None,
            "store": False,
            "temperature": body.get("temperature", 1.0),
            "text": {"format": {"type": "text"}},
            "tool_choice": "none",
            "tools": [],
            "top_p": body.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": usage,
            "user": body.get("user"),
            "metadata": {},
        }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


class _Events:
    """Server-sent events numbered in order, as the Responses API streams them."""

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response
        self.sequence_number = 0

    async def send(self, event: dict[str, Any]) -> None:
        payload = {**event, "sequence_number": self.sequence_number}
        self.sequence_number += 1
        await send_event(self.response, payload, event=event["type"])
