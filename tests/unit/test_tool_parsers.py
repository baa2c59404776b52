"""Tool calls parsed out of model text: Hermes/Qwen `<tool_call>` and Llama 3 JSON, whole and streamed in any
split, and the forced (required / named) outputs; plus the request side (tools, tool_choice, messages)."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import jsonschema
import pytest

from engine.tokenizer import Tokenizer
from router.chat_messages import template_messages
from router.http_error import HttpError
from router.openai_protocol import ParsedRequest, parse_request
from router.prompt_encoder import PromptEncoder
from router.tool_calls import ToolChoice, ToolPlan, read_tool_plan
from router.tool_parsers import (
    CallStream,
    Piece,
    ToolFormat,
    call_stream,
    merge_deltas,
    parse_whole,
    resolve_format,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}


def plan(choice: object = None, parallel: bool = True) -> ToolPlan:
    body: dict = {"tools": [WEATHER, TIME], "parallel_tool_calls": parallel}
    if choice is not None:
        body["tool_choice"] = choice
    found = read_tool_plan(body)
    assert found is not None
    return found


def streamed(stream: CallStream, text: str, seed: int) -> Piece:
    """Feed text in random splits, as tokens arrive, then finish."""
    rng, out, at = random.Random(seed), Piece(), 0
    while at < len(text):
        step = rng.randint(1, 5)
        out += stream.feed(text[at : at + step])
        at += step
    return out + stream.finish()


HERMES_TWO_CALLS = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
)


def test_hermes_calls_and_content_whole_and_streamed_agree() -> None:
    content, calls = parse_whole(call_stream(plan(), ToolFormat.HERMES), HERMES_TWO_CALLS)
    assert content == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "c"}),
        ("get_time", {}),
    ]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    for seed in range(20):
        stream = call_stream(plan(), ToolFormat.HERMES)
        piece = streamed(stream, HERMES_TWO_CALLS, seed)
        assert piece.content.strip() == "Let me check."
        merged = merge_deltas(piece.tool_deltas)
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in merged] == [
            (c["function"]["name"], c["function"]["arguments"]) for c in calls
        ]
        assert stream.called
        # the first delta of each call names it, carries its id and type
        firsts = {d["index"]: d for d in reversed(piece.tool_deltas)}
        assert all(d["id"] and d["type"] == "function" and d["function"]["name"] for d in firsts.values())


def test_hermes_text_without_calls_streams_through_and_bad_calls_stay_content() -> None:
    for text in (
        "Just text, with a < sign and <tool but no call.",
        "<tool_call>{not json}</tool_call> after",
    ):
        for seed in range(5):
            stream = call_stream(plan(), ToolFormat.HERMES)
            piece = streamed(stream, text, seed)
            assert piece.content == text and not piece.tool_deltas and not stream.called
        assert parse_whole(call_stream(plan(), ToolFormat.HERMES), text) == (text, [])


def test_hermes_call_cut_at_eos_without_its_closing_tag_still_counts() -> None:
    content, calls = parse_whole(
        call_stream(plan(), ToolFormat.HERMES), '<tool_call>\n{"name": "get_time", "arguments": {}}\n'
    )
    assert content is None and [c["function"]["name"] for c in calls] == ["get_time"]


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    _, calls = parse_whole(call_stream(plan(parallel=False), ToolFormat.HERMES), HERMES_TWO_CALLS)
    assert [c["function"]["name"] for c in calls] == ["get_weather"]


def test_llama3_json_calls() -> None:
    text = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "get_time", "parameters": {}}'
    for seed in range(10):
        piece = streamed(call_stream(plan(), ToolFormat.LLAMA3), text, seed)
        assert piece.content == ""
        merged = merge_deltas(piece.tool_deltas)
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in merged] == [
            ("get_weather", {"city": "Oslo"}),
            ("get_time", {}),
        ]
    plain = "The weather is fine {probably}."
    assert parse_whole(call_stream(plan(), ToolFormat.LLAMA3), plain) == (plain, [])
    not_a_call = '{"answer": 42}'
    assert parse_whole(call_stream(plan(), ToolFormat.LLAMA3), not_a_call) == (not_a_call, [])


def test_named_choice_streams_the_arguments_as_they_come() -> None:
    named = plan({"type": "function", "function": {"name": "get_weather"}})
    stream = call_stream(named, None)
    first = stream.feed('{"ci')
    assert first.tool_deltas[0]["function"] == {"name": "get_weather", "arguments": '{"ci'}
    rest = stream.feed('ty": "Rome"}') + stream.finish()
    assert rest.tool_deltas == [{"index": 0, "function": {"arguments": 'ty": "Rome"}'}}]
    content, calls = parse_whole(call_stream(named, None), '{"city": "Rome"}')
    assert content is None and calls[0]["function"]["arguments"] == '{"city": "Rome"}'


def test_required_choice_parses_the_array_and_cut_output_stays_content() -> None:
    required = plan("required")
    text = '[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Lima"}}]'
    content, calls = parse_whole(call_stream(required, None), text)
    assert content is None and [c["function"]["name"] for c in calls] == ["get_time", "get_weather"]
    assert parse_whole(call_stream(required, None), text[:20]) == (text[:20], [])


def test_forcing_schemas_accept_valid_calls_only() -> None:
    named = plan({"type": "function", "function": {"name": "get_weather"}}).constraint()
    assert named is not None and json.loads(named.text) == WEATHER["function"]["parameters"]
    required = plan("required", parallel=False).constraint()
    assert required is not None
    schema = json.loads(required.text)
    jsonschema.validate([{"name": "get_weather", "arguments": {"city": "x"}}], schema)
    for bad in ([], [{"name": "get_weather", "arguments": {}}], [{"name": "nope", "arguments": {}}],
                [{"name": "get_time", "arguments": {}}, {"name": "get_time", "arguments": {}}]):  # fmt: skip
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    assert plan("auto").constraint() is None


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": "x"}, "tools"),
        ({"tools": [{"type": "retrieval"}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "tools"),
        ({"tools": [TIME, TIME]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [TIME], "tool_choice": "sometimes"}, "tool_choice"),
        (
            {"tools": [TIME], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
            "tool_choice",
        ),
        ({"tools": [TIME], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ],
)
def test_bad_tool_fields_are_400s_naming_them(body: dict, param: str) -> None:
    with pytest.raises(HttpError) as info:
        read_tool_plan(body)
    assert info.value.status == 400 and info.value.param == param


def test_tool_choice_none_and_no_tools_mean_no_plan() -> None:
    assert read_tool_plan({}) is None
    assert read_tool_plan({"tools": [TIME], "tool_choice": "none"}) is None
    assert plan().choice == ToolChoice.AUTO


def test_resolve_format_from_the_template() -> None:
    assert resolve_format("auto", "{% if tools %}<tool_call>{% endif %}") == ToolFormat.HERMES
    assert resolve_format("auto", "{% if tools %}<|python_tag|>{% endif %}") == ToolFormat.LLAMA3
    assert resolve_format("auto", "{{ messages }}") is None
    assert resolve_format("llama3", "{% for t in tools %}{% endfor %}") == ToolFormat.LLAMA3


def test_messages_with_tool_calls_and_results() -> None:
    messages = template_messages(
        [
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "sunny"}]},
        ]
    )
    assert messages[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "id": "call_1",
                        "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
    }  # fmt: skip
    assert messages[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}
    bad_cases = [
        [{"role": "tool", "content": "x"}],  # no tool_call_id
        [{"role": "user", "content": None}],
        [{"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]}],
        [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"function": {"name": "f", "arguments": "{"}}],
            }
        ],
        [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}],
            }
        ],
    ]
    for bad in bad_cases:
        with pytest.raises(HttpError) as info:
            template_messages(bad)
        assert info.value.param == "messages"


def test_auto_needs_a_template_that_shows_tools_but_forced_calls_do_not(llama_dir: Path) -> None:
    encoder = PromptEncoder(Tokenizer.from_dir(llama_dir))
    body = {
        "model": llama_dir.name,
        "messages": [{"role": "user", "content": "Hi"}],
        "tools": [WEATHER, TIME],
    }

    def parse(extra: dict, tool_format: ToolFormat | None) -> ParsedRequest:
        return asyncio.run(
            parse_request({**body, **extra}, chat=True, encoder=encoder, model_name=llama_dir.name,
                          max_model_len=2048, vocab_size=1024, tool_format=tool_format)
        )  # fmt: skip

    try:
        with pytest.raises(HttpError) as info:  # the model would never see the tools: refused, not ignored
            parse({}, None)
        assert info.value.param == "tools" and "template" in info.value.message
        forced = parse({"tool_choice": "required"}, None)
        assert forced.sampling.structured_output.json_schema  # the call is forced by a schema
        auto = parse({}, ToolFormat.HERMES)
        assert auto.tools is not None and not auto.sampling.HasField("structured_output")
        assert len(auto.prompts[0]) > len(parse({"tool_choice": "none"}, ToolFormat.HERMES).prompts[0])
    finally:
        encoder.close()
