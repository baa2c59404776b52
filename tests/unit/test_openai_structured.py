"""The OpenAI/vLLM structured-output fields as the router reads them, and their trip over the wire to the engine."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cluster.sampling_proto import sampling_from_proto, structured_to_proto
from engine.structured_spec import StructuredKind, StructuredOutput
from router.http_error import HttpError
from router.openai_values import read_structured_output
from splitserve.v1 import inference_pb2 as pb

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, None),
        ({"response_format": {"type": "text"}}, None),
        ({"response_format": {"type": "json_object"}}, StructuredOutput(StructuredKind.JSON_OBJECT)),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "n", "schema": SCHEMA, "strict": True},
                }
            },
            StructuredOutput(StructuredKind.JSON_SCHEMA, text=json.dumps(SCHEMA)),
        ),
        ({"guided_json": SCHEMA}, StructuredOutput(StructuredKind.JSON_SCHEMA, text=json.dumps(SCHEMA))),
        (
            {"guided_json": '{"type": "string"}'},
            StructuredOutput(StructuredKind.JSON_SCHEMA, text='{"type": "string"}'),
        ),
        ({"guided_regex": "[0-9]+"}, StructuredOutput(StructuredKind.REGEX, text="[0-9]+")),
        ({"guided_choice": ["a", "b"]}, StructuredOutput(StructuredKind.CHOICE, choices=("a", "b"))),
        ({"guided_grammar": 'root ::= "x"'}, StructuredOutput(StructuredKind.GRAMMAR, text='root ::= "x"')),
        (
            {"response_format": {"type": "text"}, "guided_regex": "a"},
            StructuredOutput(StructuredKind.REGEX, text="a"),
        ),
    ],
)
def test_each_field_reads_as_its_constraint_and_survives_the_wire(
    body: dict[str, Any], expected: StructuredOutput | None
) -> None:
    spec = read_structured_output(body)
    assert spec == expected
    if spec is not None:
        wire = pb.SamplingParameters(structured_output=structured_to_proto(spec))
        assert (
            sampling_from_proto(pb.SamplingParameters.FromString(wire.SerializeToString())).structured == spec
        )


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        ({"response_format": {"type": "json_schema"}}, "response_format", "takes"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "n"}}},
            "response_format",
            "schema",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
            "response_format",
            "name",
        ),
        ({"response_format": {"type": "xml"}}, "response_format", "xml"),
        ({"response_format": "json"}, "response_format", "object"),
        ({"guided_json": "{oops"}, "guided_json", "not valid JSON"),
        ({"guided_json": [1]}, "guided_json", "JSON schema"),
        ({"guided_regex": 5}, "guided_regex", "string"),
        ({"guided_choice": []}, "guided_choice", "at least one"),
        ({"guided_choice": "a"}, "guided_choice", "list of strings"),
        ({"guided_grammar": ""}, "guided_grammar", "empty"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "one output constraint"),
        (
            {"response_format": {"type": "json_object"}, "guided_json": SCHEMA},
            "guided_json",
            "response_format",
        ),
    ],
)
def test_a_malformed_or_second_constraint_is_a_400_naming_the_field(
    body: dict[str, Any], field: str, says: str
) -> None:
    with pytest.raises(HttpError) as info:
        read_structured_output(body)
    assert info.value.status == 400 and info.value.param == field and says in info.value.message, (
        info.value.message
    )
