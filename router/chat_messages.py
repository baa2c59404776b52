"""A chat request's `messages`, checked and put in the form chat templates expect.

Content is a string or a list of text parts (joined). Besides system, user and assistant turns, an agent's
conversation carries its tool calls: an assistant message with `tool_calls` (content may be null) and the results as
role `tool` messages with their `tool_call_id`. A call's `arguments` arrive as a JSON string; templates (and
transformers) expect a mapping, so it is parsed here: arguments that are not a JSON object are a 400. Whether the
model's template can render a role is the template's to say (its error becomes a 400 too).
"""

from __future__ import annotations

import json
from typing import Any

from router.http_error import HttpError

_PARAM = "messages"


def template_messages(messages: object) -> list[dict[str, Any]]:
    """The conversation as the chat template gets it; HttpError (400, param messages) naming what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise HttpError(400, "messages must be a non-empty list", param=_PARAM)
    return [_message(i, message) for i, message in enumerate(messages)]


def _message(index: int, message: object) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise HttpError(400, f"{where} must be an object with a role", param=_PARAM)
    role = message["role"]
    calls = message.get("tool_calls")
    content = _content(where, message.get("content"), may_be_null=role == "assistant" and bool(calls))
    out: dict[str, Any] = {"role": role, "content": content}
    if isinstance(message.get("name"), str):
        out["name"] = message["name"]
    if calls is not None and calls != []:
        if role != "assistant":
            raise HttpError(400, f"{where}: only assistant messages carry tool_calls", param=_PARAM)
        out["tool_calls"] = _tool_calls(where, calls)
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str):
            raise HttpError(400, f"{where}: a tool message needs its tool_call_id (a string)", param=_PARAM)
        out["tool_call_id"] = call_id
    return out


def _content(where: str, content: object, may_be_null: bool) -> str:
    if content is None and may_be_null:
        return ""
    if isinstance(content, list):  # content parts: only text is supported
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        strings = [t for t in texts if isinstance(t, str)]
        if len(strings) != len(content):
            raise HttpError(400, f"{where}.content: only text parts are supported", param=_PARAM)
        return "".join(strings)
    if not isinstance(content, str):
        raise HttpError(400, f"{where}.content must be a string", param=_PARAM)
    return content


def _tool_calls(where: str, calls: object) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise HttpError(400, f"{where}.tool_calls must be a list", param=_PARAM)
    out = []
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise HttpError(400, f"{at} must be an object with a function and its name", param=_PARAM)
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except json.JSONDecodeError:
                raise HttpError(400, f"{at}.function.arguments is not valid JSON", param=_PARAM) from None
        if not isinstance(arguments, dict):
            raise HttpError(400, f"{at}.function.arguments must be a JSON object", param=_PARAM)
        entry: dict[str, Any] = {
            "type": "function",
            "function": {"name": function["name"], "arguments": arguments},
        }
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out
