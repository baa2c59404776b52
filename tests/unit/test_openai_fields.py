"""The field policy of the OpenAI endpoint: honoured fields pass, others only at their neutral values, and the
README's table says the same as the code."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.openai_fields import HONOURED, UNSUPPORTED, UnsupportedField, check_fields


def test_honoured_fields_pass_and_neutral_values_of_the_others_too() -> None:
    check_fields({"model": "m", "prompt": "p", "max_tokens": 3, "stop_token_ids": [1]}, "completions")
    check_fields({"echo": False, "best_of": 1, "logit_bias": {}, "suffix": None}, "completions")
    check_fields(
        {"messages": [], "tools": [], "tool_choice": "none", "response_format": {"type": "text"}}, "chat"
    )


@pytest.mark.parametrize(
    ("body", "endpoint", "field"),
    [
        ({"echo": True}, "chat", "echo"),  # honoured by completions only
        ({"best_of": 2}, "chat", "best_of"),
        ({"suffix": "end"}, "completions", "suffix"),
        ({"tools": [{"type": "function"}]}, "completions", "tools"),  # tool calling is chat's
        ({"tool_choice": "required"}, "completions", "tool_choice"),
        ({"structural_tag": "{}"}, "chat", "structural_tag"),
        ({"guided_decoding_backend": "outlines"}, "chat", "guided_decoding_backend"),
        ({"min_tokens": 4}, "completions", "min_tokens"),
        ({"skip_special_tokens": False}, "completions", "skip_special_tokens"),
        ({"messages": []}, "completions", "messages"),  # a chat field sent to completions
        ({"prompt": "x"}, "chat", "prompt"),
        ({"max_token": 5}, "completions", "max_token"),  # a typo
    ],
)
def test_the_first_field_asking_for_something_unsupported_is_named(
    body: dict, endpoint: str, field: str
) -> None:
    with pytest.raises(UnsupportedField) as info:
        check_fields(body, endpoint)
    assert info.value.name == field and field in str(info.value)


def test_a_field_is_refused_only_where_it_is_not_honoured() -> None:
    both = HONOURED["completions"] & HONOURED["chat"]
    assert not both & set(UNSUPPORTED)
    for endpoint, other in (("completions", "chat"), ("chat", "completions")):
        for name in HONOURED[endpoint] - HONOURED[other]:
            assert name in UNSUPPORTED or name in {
                "prompt",
                "messages",
                "max_completion_tokens",
                "top_logprobs",
            }, name


def test_the_readme_field_table_matches_the_server() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("### Request fields", 1)[1].split("\n## ", 1)[0]
    honoured: dict[str, set[str]] = {"completions": set(), "chat": set()}
    refused: set[str] = set()
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        names = {n.strip("` ") for n in cells[0].split(",")}
        if cells[1].startswith("honoured"):
            only = "completions" if "(completions" in cells[1] else "chat" if "(chat" in cells[1] else None
            for endpoint in honoured:
                if only in (None, endpoint):
                    honoured[endpoint] |= names
        else:
            refused |= names
    assert honoured == {endpoint: set(names) for endpoint, names in HONOURED.items()}
    assert refused == set(UNSUPPORTED)
