"""Tool calling on the chat endpoint: what a request's `tools`, `tool_choice` and `parallel_tool_calls` ask for.

A request with tools becomes a ToolPlan:
- `none`: the tools are not shown to the model (OpenAI: the model will not call any); the answer is plain text.
- `auto` (the default with tools): the tools go into the prompt through the model's chat template, and the output is
  parsed for calls in the model's own format (router/tool_parsers.py: Hermes/Qwen `<tool_call>` or Llama 3 JSON).
  A template that never renders `tools` would leave the model ignorant of them, so that is a 400, not a silent answer.
- `required` and a named function: the output is forced with a JSON schema (structured output, engine/
  structured_output.py), so that even a model that would rather chat returns a valid call whose arguments
  validate against the tool's parameters. A named function's output is its arguments object; `required` outputs a
  JSON array of {"name", "arguments"} (one item when parallel_tool_calls is false).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from engine.structured_spec import StructuredKind, StructuredOutput
from router.http_error import HttpError

# OpenAI's rule for function names: letters, digits, underscores and dashes, at most 64 (dots too, as vLLM allows).
_TOOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_TOOLS = 128  # OpenAI's limit
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


class ToolChoice(StrEnum):
    AUTO = "auto"
    REQUIRED = "required"
    NAMED = "named"  # one function, named in tool_choice


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    parameters: dict[str, Any]  # a JSON schema for the arguments ({"type": "object"} when the tool gave none)
    definition: dict[str, Any]  # as the chat template sees it: {"type": "function", "function": {...}}


@dataclass(frozen=True, slots=True)
class ToolPlan:
    tools: tuple[Tool, ...]
    choice: ToolChoice
    named: str | None  # the function tool_choice names (ToolChoice.NAMED)
    parallel: bool  # parallel_tool_calls: more than one call per answer

    @property
    def forced(self) -> bool:
        return self.choice != ToolChoice.AUTO

    def template_tools(self) -> list[dict[str, Any]]:
        """The tools as the chat template gets them (transformers' convention)."""
        return [tool.definition for tool in self.tools]

    def constraint(self) -> StructuredOutput | None:
        """The JSON schema that forces a call (required or named); None for auto."""
        if self.choice == ToolChoice.AUTO:
            return None
        if self.choice == ToolChoice.NAMED:
            schema: dict[str, Any] = self.tool(self.named or "").parameters
        else:
            calls = [
                {
                    "type": "object",
                    "properties": {"name": {"enum": [tool.name]}, "arguments": tool.parameters},
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
                for tool in self.tools
            ]
            schema = {
                "type": "array",
                "minItems": 1,
                "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
            }
            if not self.parallel:
                schema["maxItems"] = 1
        return StructuredOutput(StructuredKind.JSON_SCHEMA, text=json.dumps(schema))

    def tool(self, name: str) -> Tool:
        return next(tool for tool in self.tools if tool.name == name)


def read_tool_plan(body: dict[str, Any]) -> ToolPlan | None:
    """The request's tool plan; None when it has no tools or tool_choice is "none"."""
    tools = _read_tools(body.get("tools"))
    choice, named = _read_tool_choice(body.get("tool_choice"), tools)
    parallel = body.get("parallel_tool_calls", True)
    if parallel is None:
        parallel = True
    if not isinstance(parallel, bool):
        raise HttpError(400, "parallel_tool_calls must be a boolean", param="parallel_tool_calls")
    if choice is None:
        return None
    return ToolPlan(tools=tuple(tools), choice=choice, named=named, parallel=parallel)


def _read_tools(value: object) -> list[Tool]:
    param = "tools"
    if value is None:
        return []
    if not isinstance(value, list):
        raise HttpError(400, "tools must be a list", param=param)
    if len(value) > MAX_TOOLS:
        raise HttpError(400, f"at most {MAX_TOOLS} tools, got {len(value)}", param=param)
    tools: list[Tool] = []
    for index, item in enumerate(value):
        where = f"tools[{index}]"
        if not isinstance(item, dict) or item.get("type") != "function":
            raise HttpError(400, f'{where} must be an object with "type": "function"', param=param)
        if set(item) - {"type", "function"}:
            raise HttpError(
                400, f"{where}: unknown field {sorted(set(item) - {'type', 'function'})[0]!r}", param=param
            )
        tools.append(_read_function(item.get("function"), where))
    names = [tool.name for tool in tools]
    duplicate = next((name for name in names if names.count(name) > 1), None)
    if duplicate is not None:
        raise HttpError(400, f"tools: the function name {duplicate!r} is given twice", param=param)
    return tools


def _read_function(function: object, where: str) -> Tool:
    param = "tools"
    if not isinstance(function, dict):
        raise HttpError(400, f"{where}.function must be an object", param=param)
    unknown = set(function) - {"name", "description", "parameters", "strict"}
    if unknown:
        raise HttpError(400, f"{where}.function: unknown field {sorted(unknown)[0]!r}", param=param)
    name = function.get("name")
    if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
        raise HttpError(
            400, f"{where}.function.name must be 1 to 64 letters, digits, '_', '-' or '.'", param=param
        )
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise HttpError(400, f"{where}.function.description must be a string", param=param)
    strict = function.get("strict")
    if strict is not None and not isinstance(strict, bool):  # the arguments are enforced only when forced
        raise HttpError(400, f"{where}.function.strict must be a boolean", param=param)
    parameters = function.get("parameters")
    if parameters is None:
        parameters = dict(_ANY_OBJECT)
    if not isinstance(parameters, dict):
        raise HttpError(400, f"{where}.function.parameters must be a JSON schema object", param=param)
    definition = {"type": "function", "function": {k: v for k, v in function.items() if v is not None}}
    return Tool(name=name, parameters=parameters, definition=definition)


def _read_tool_choice(value: object, tools: list[Tool]) -> tuple[ToolChoice | None, str | None]:
    param = "tool_choice"
    if value is None:
        return (ToolChoice.AUTO if tools else None), None
    if value == "none":
        return None, None
    if value in ("auto", "required"):
        if not tools:
            raise HttpError(400, f'tool_choice "{value}" needs tools', param=param)
        return ToolChoice(value), None
    if (
        isinstance(value, dict)
        and value.get("type") == "function"
        and isinstance(value.get("function"), dict)
    ):
        name = value["function"].get("name")
        if not isinstance(name, str):
            raise HttpError(400, "tool_choice.function.name must be a string", param=param)
        if name not in {tool.name for tool in tools}:
            raise HttpError(
                400, f"tool_choice names the function {name!r}, which is not in tools", param=param
            )
        return ToolChoice.NAMED, name
    raise HttpError(
        400,
        'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
        param=param,
    )
