"""Tool calling with the openai client against a live split cluster (1 prefill + 1 decode) on a random tiny model.

`tool_choice: required` and a named function force a call with a JSON schema, so even a random model's calls must
name a tool and carry arguments that validate against that tool's schema, streamed or not. `auto` parses the
model's own `<tool_call>` text (the tiny model's template is Hermes/Qwen-style); a random model never writes one
by itself, so a `guided_regex` makes it write one, and the parser must find it. A conversation with an assistant's
calls and the tools' results is accepted, and the prompt is what transformers renders for it, tools included.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
import transformers

from ops.launcher import ClusterSpec, LocalCluster

pytestmark = pytest.mark.timeout(300)
MAX_TOKENS = (
    300  # far above what one call under the bounded schemas needs: a call cut by length fails the test
)
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 8},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                },
                "required": ["city", "unit", "days"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "book_table",
            "parameters": {
                "type": "object",
                "properties": {
                    "guests": {"type": "integer", "minimum": 1, "maximum": 12},
                    "tags": {"type": "array", "items": {"enum": ["window", "quiet"]}, "maxItems": 2},
                    "vip": {"type": "boolean"},
                },
                "required": ["guests", "tags", "vip"],
                "additionalProperties": False,
            },
        },
    },
]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
MESSAGES = [{"role": "user", "content": "What is the weather in Oslo, and book me a table?"}]


@pytest.fixture(scope="module")
def split(llama_dir: Path) -> Iterator[LocalCluster]:
    with LocalCluster(
        ClusterSpec(model_dir=llama_dir, prefill=1, decode=1, grpc_port=0, http_port=0)
    ) as running:
        yield running


@pytest.fixture(scope="module")
def model(llama_dir: Path) -> str:
    return llama_dir.name


def async_client(cluster: LocalCluster) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"http://{cluster.http_address}/v1", api_key="none", max_retries=0, timeout=120
    )


def request(model: str, seed: int, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, "tools": TOOLS, "max_tokens": MAX_TOKENS,
            "temperature": 1.0, "seed": seed, **extra}  # fmt: skip


async def streamed_call(
    client: openai.AsyncOpenAI, body: dict[str, Any]
) -> tuple[str | None, list[dict], str]:
    """(content, tool calls as accumulated from the deltas, finish_reason) of one streamed request."""
    content, calls, finish = "", {}, ""
    stream = await client.chat.completions.create(**body, stream=True)
    async for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                if delta.index not in calls:  # the first delta of a call names it
                    assert delta.id and delta.type == "function" and delta.function and delta.function.name
                    calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
                calls[delta.index]["arguments"] += (delta.function and delta.function.arguments) or ""
            finish = choice.finish_reason or finish
    return content or None, [calls[i] for i in sorted(calls)], finish


def check_calls(calls: list[dict[str, Any]], allowed: set[str]) -> None:
    assert calls, "no tool call"
    for call in calls:
        assert call["name"] in allowed, call
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def test_required_yields_valid_calls_streaming_and_not(split: LocalCluster, model: str) -> None:
    one_call = {"tool_choice": "required", "parallel_tool_calls": False}

    async def main() -> None:
        async with async_client(split) as client:
            whole = await asyncio.gather(
                *(client.chat.completions.create(**request(model, seed, **one_call)) for seed in range(12))
            )
            # With parallel calls a random model may go on listing calls for long: room for them, sent one by one.
            whole += [
                await client.chat.completions.create(
                    **request(model, seed, tool_choice="required", max_tokens=1300)
                )
                for seed in range(3)
            ]
            for out in whole:
                choice = out.choices[0]
                assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
                calls = choice.message.tool_calls or []
                assert all(c.id.startswith("call_") and c.type == "function" for c in calls)
                check_calls([{"name": c.function.name, "arguments": c.function.arguments} for c in calls],
                            set(SCHEMAS))  # fmt: skip
            assert all(len(out.choices[0].message.tool_calls or []) == 1 for out in whole[:12])
            streamed = await asyncio.gather(
                *(streamed_call(client, request(model, seed, **one_call)) for seed in range(100, 106))
            )
            for content, calls, finish in streamed:
                assert finish == "tool_calls" and content is None and len(calls) == 1
                check_calls(calls, set(SCHEMAS))

    asyncio.run(main())


def test_a_named_function_is_called_with_valid_arguments_streaming_and_not(
    split: LocalCluster, model: str
) -> None:
    named = {"type": "function", "function": {"name": "book_table"}}

    async def main() -> None:
        async with async_client(split) as client:
            for seed in range(4):
                out = await client.chat.completions.create(**request(model, seed, tool_choice=named))
                [call] = out.choices[0].message.tool_calls or []
                check_calls(
                    [{"name": call.function.name, "arguments": call.function.arguments}], {"book_table"}
                )
                content, calls, finish = await streamed_call(client, request(model, seed, tool_choice=named))
                assert content is None and finish == "tool_calls" and len(calls) == 1
                check_calls(calls, {"book_table"})

    asyncio.run(main())


def test_auto_parses_the_models_own_tool_call_text(split: LocalCluster, model: str) -> None:
    # A random model never writes <tool_call> on its own; a regex makes it write one (and some words before it).
    regex = (
        r'Checking\. <tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Oslo|Rome)", '
        r'"unit": "celsius", "days": [1-7]\}\}\n</tool_call>'
    )

    async def main() -> None:
        async with async_client(split) as client:
            body = request(model, 1, extra_body={"guided_regex": regex})
            out = await client.chat.completions.create(**body)
            choice = out.choices[0]
            assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
            [call] = choice.message.tool_calls or []
            check_calls([{"name": call.function.name, "arguments": call.function.arguments}], {"get_weather"})
            content, calls, finish = await streamed_call(client, body)
            assert content is not None and content.strip() == "Checking." and finish == "tool_calls"
            assert [c["arguments"] for c in calls] == [call.function.arguments]

    asyncio.run(main())


def test_a_tool_round_trip_is_rendered_as_transformers_renders_it(
    split: LocalCluster, model: str, llama_dir: Path
) -> None:
    conversation: list[dict[str, Any]] = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius", "days": 1}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4 degrees, rain"},
    ]  # fmt: skip
    client = openai.OpenAI(base_url=f"http://{split.http_address}/v1", api_key="none", max_retries=0)
    out = client.chat.completions.create(
        model=model,
        messages=conversation,
        tools=TOOLS,
        max_tokens=3,
        temperature=0,  # type: ignore[arg-type]
    )
    hf = transformers.AutoTokenizer.from_pretrained(llama_dir)
    rendered = [{**m, "content": m["content"] or ""} for m in conversation]
    rendered[1]["tool_calls"] = [
        {
            "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius", "days": 1}},
        }
    ]
    text = hf.apply_chat_template(rendered, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    expected = hf(text, add_special_tokens=False)["input_ids"]  # the template holds the BOS
    assert out.usage is not None and out.usage.prompt_tokens == len(expected)
    # tool_choice none: the tools are not shown to the model, so the prompt is shorter.
    plain = client.chat.completions.create(
        model=model,
        messages=conversation,
        tools=TOOLS,
        tool_choice="none",
        max_tokens=3,  # type: ignore[arg-type]
    )
    assert plain.usage is not None and plain.usage.prompt_tokens < out.usage.prompt_tokens
    assert plain.choices[0].message.tool_calls is None


def test_conflicting_and_malformed_tool_requests_are_400s(split: LocalCluster, model: str) -> None:
    client = openai.OpenAI(base_url=f"http://{split.http_address}/v1", api_key="none", max_retries=0)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "x", "parameters": "{}"}}]}, "tools"),
        ({"messages": [{"role": "tool", "content": "result without its call id"}]}, "messages"),
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(**{**request(model, 0), "max_tokens": 2, **extra})
        assert info.value.body["param"] == param, info.value.body  # type: ignore[index]
