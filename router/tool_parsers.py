"""Tool calls out of a chat completion's text, as it streams and once it is whole.

Formats (chosen by the router's --tool-call-parser, or by the chat template with `auto`):
- hermes (Hermes, Qwen 2.5/3 and their ChatML kin): each call is `<tool_call>{"name": ..., "arguments": {...}}
  </tool_call>`; text around the calls is the message's content.
- llama3 (Llama 3.1+ JSON tool calling): the whole answer is `{"name": ..., "parameters": {...}}` (several are
  separated by `;`), optionally after `<|python_tag|>`; an answer that is not such JSON is plain content.
A forced call (tool_choice required or a named function, router/tool_calls.py) does not depend on the format: a named
function's output is its arguments object, streamed as argument fragments as it is generated; `required` outputs a
JSON array of {"name", "arguments"}.

Every parser is a CallStream: `feed` takes text as it arrives and returns what can be sent now (content, and
tool-call deltas in OpenAI's streaming shape: the first delta of a call has its index, id, type and name, the rest
add to its arguments); `finish` flushes what was held back. A whole response is the same stream fed at once, its
deltas merged (`parse_whole`), so streaming and non-streaming answers agree by construction. Text that looks like a
call but is not valid (bad JSON, no name) stays content, so nothing the model said is lost; with
parallel_tool_calls false only the first call is kept.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from router.tool_calls import ToolChoice, ToolPlan

_PYTHON_TAG = "<|python_tag|>"


class ToolFormat(StrEnum):
    HERMES = "hermes"
    LLAMA3 = "llama3"


def resolve_format(flag: str, chat_template: str | None) -> ToolFormat | None:
    """The parser for --tool-call-parser `flag`; with "auto", the one the template's own words point to (None: the
    template renders no tools, or in no format known here)."""
    if flag != "auto":
        return ToolFormat(flag)
    if not chat_template or "tools" not in chat_template:
        return None
    if "<tool_call>" in chat_template:
        return ToolFormat.HERMES
    if _PYTHON_TAG in chat_template or "ipython" in chat_template:
        return ToolFormat.LLAMA3
    return None


@dataclass
class Piece:
    """What a CallStream lets through at one step."""

    content: str = ""
    tool_deltas: list[dict[str, Any]] = field(default_factory=list)

    def __add__(self, other: Piece) -> Piece:
        return Piece(self.content + other.content, self.tool_deltas + other.tool_deltas)


class CallStream:
    """Base: numbering and ids of the calls one choice makes."""

    def __init__(self, parallel: bool = True) -> None:
        self.parallel = parallel
        self.calls = 0

    @property
    def called(self) -> bool:
        return self.calls > 0

    def feed(self, text: str) -> Piece:
        raise NotImplementedError

    def finish(self) -> Piece:
        raise NotImplementedError

    def _call(self, name: str, arguments: str) -> list[dict[str, Any]]:
        """The deltas of one whole call; none when it is beyond the first and parallel calls are off."""
        if self.calls and not self.parallel:
            return []
        self.calls += 1
        return [_call_delta(self.calls - 1, name, arguments)]


def call_stream(plan: ToolPlan, fmt: ToolFormat | None) -> CallStream:
    if plan.choice == ToolChoice.NAMED:
        return _NamedStream(plan.named or "")
    if plan.choice == ToolChoice.REQUIRED:
        return _RequiredStream(plan.parallel)
    if fmt == ToolFormat.LLAMA3:
        return _Llama3Stream(plan.parallel)
    return _HermesStream(plan.parallel)


def parse_whole(stream: CallStream, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """A whole answer's content (None when only calls, or blank, remain) and its tool calls (OpenAI's message shape)."""
    piece = stream.feed(text) + stream.finish()
    if not piece.tool_deltas:
        return piece.content, []
    return piece.content.strip() or None, merge_deltas(piece.tool_deltas)


def merge_deltas(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Streaming tool-call deltas joined into whole calls, as a client accumulates them."""
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        call = calls.setdefault(
            delta["index"], {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
        )
        call["id"] = delta.get("id", call["id"])
        function = delta.get("function", {})
        call["function"]["name"] = function.get("name", call["function"]["name"])
        call["function"]["arguments"] += function.get("arguments", "")
    return [calls[i] for i in sorted(calls)]


def _call_delta(index: int, name: str, arguments: str) -> dict[str, Any]:
    return {
        "index": index,
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def _call_from_json(value: object) -> tuple[str, str] | None:
    """(name, arguments as JSON text) of a call object; None when value is not one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return value["name"], json.dumps(arguments, ensure_ascii=False)


def _held_prefix(text: str, marker: str) -> int:
    """Length of the longest end of text that could be the start of marker (held back until it is decided)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


class _HermesStream(CallStream):
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self, parallel: bool) -> None:
        super().__init__(parallel)
        self.buffer = ""
        self.inside = False  # between OPEN and CLOSE

    def feed(self, text: str) -> Piece:
        self.buffer += text
        out = Piece()
        while True:
            if not self.inside:
                at = self.buffer.find(self.OPEN)
                if at < 0:
                    keep = _held_prefix(self.buffer, self.OPEN)
                    out.content += self.buffer[: len(self.buffer) - keep]
                    self.buffer = self.buffer[len(self.buffer) - keep :]
                    return out
                out.content += self.buffer[:at]
                self.buffer, self.inside = self.buffer[at + len(self.OPEN) :], True
            else:
                at = self.buffer.find(self.CLOSE)
                if at < 0:
                    return out
                out += self._body(self.buffer[:at], closed=True)
                self.buffer, self.inside = self.buffer[at + len(self.CLOSE) :], False

    def finish(self) -> Piece:
        # A call cut short of its closing tag still counts when its JSON is whole (models often stop at EOS there).
        out = self._body(self.buffer, closed=False) if self.inside else Piece(self.buffer)
        self.buffer, self.inside = "", False
        return out

    def _body(self, body: str, closed: bool) -> Piece:
        try:
            call = _call_from_json(json.loads(body))
        except json.JSONDecodeError:
            call = None
        if call is None:
            return Piece(self.OPEN + body + (self.CLOSE if closed else ""))
        return Piece(tool_deltas=self._call(*call))


class _Llama3Stream(CallStream):
    def __init__(self, parallel: bool) -> None:
        super().__init__(parallel)
        self.buffer = ""
        self.mode: str | None = None  # None: undecided; "content"; "calls": held until the end

    def feed(self, text: str) -> Piece:
        if self.mode == "content":
            return Piece(text)
        self.buffer += text
        start = self.buffer.lstrip()
        if self.mode is None and start:
            if start.startswith(("{", _PYTHON_TAG)):
                self.mode = "calls"
            elif not _PYTHON_TAG.startswith(start):
                self.mode, text, self.buffer = "content", self.buffer, ""
                return Piece(text)
        return Piece()

    def finish(self) -> Piece:
        text, self.buffer = self.buffer, ""
        calls = self._parse(text) if self.mode == "calls" else None
        if calls is None:
            return Piece(text)
        out = Piece()
        for name, arguments in calls:
            out.tool_deltas += self._call(name, arguments)
        return out

    @staticmethod
    def _parse(text: str) -> list[tuple[str, str]] | None:
        rest = text.strip().removeprefix(_PYTHON_TAG).strip()
        decoder, calls = json.JSONDecoder(), []
        while rest:
            try:
                value, end = decoder.raw_decode(rest)
            except json.JSONDecodeError:
                return None
            call = _call_from_json(value)
            if call is None:
                return None
            calls.append(call)
            rest = rest[end:].strip().removeprefix(";").strip()
        return calls or None


class _NamedStream(CallStream):
    """tool_choice names a function: the whole output is its arguments, streamed as they come."""

    def __init__(self, name: str) -> None:
        super().__init__(parallel=False)
        self.name = name

    def feed(self, text: str) -> Piece:
        if not self.called:
            return Piece(tool_deltas=self._call(self.name, text))
        return Piece(tool_deltas=[{"index": 0, "function": {"arguments": text}}]) if text else Piece()

    def finish(self) -> Piece:
        return self.feed("") if not self.called else Piece()


class _RequiredStream(CallStream):
    """tool_choice required: the output is a JSON array of calls, sent once whole."""

    def __init__(self, parallel: bool) -> None:
        super().__init__(parallel)
        self.buffer = ""

    def feed(self, text: str) -> Piece:
        self.buffer += text
        return Piece()

    def finish(self) -> Piece:
        text, self.buffer = self.buffer, ""
        try:
            items = json.loads(text)
        except json.JSONDecodeError:  # cut short (max_tokens): what was generated, as content
            return Piece(text)
        found = [_call_from_json(item) for item in items] if isinstance(items, list) else []
        calls = [call for call in found if call is not None]
        if not calls or len(calls) != len(found):
            return Piece(text)
        out = Piece()
        for name, arguments in calls:
            out.tool_deltas += self._call(name, arguments)
        return out
