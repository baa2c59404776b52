"""Structured outputs over HTTP with the openai client, through a live split cluster (1 prefill + 1 decode) and a
colocated one: the prefill node samples the first token under the grammar and the decode node continues from it.

On a random tiny model, every output sampled at temperature 1 must parse and validate (jsonschema), fullmatch its
regex or be one of its choices; finish_reason must be "stop" (the grammar ended it, not max_tokens). The schemas are
bounded (maxLength, maxItems, enums, integer ranges) so that a model that babbles still closes every value.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from ops.launcher import ClusterSpec, LocalCluster

pytestmark = pytest.mark.timeout(300)
MAX_TOKENS = 300  # far above what the bounded schemas need: a response cut by length fails the test
BATCH = 25  # requests in flight at once
ITEM = {
    "type": "object",
    "properties": {
        "sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
        "qty": {"type": "integer", "minimum": 1, "maximum": 99},
        "size": {"enum": ["S", "M", "L"]},
    },
    "required": ["sku", "qty", "size"],
    "additionalProperties": False,
}
SCHEMAS: list[dict[str, Any]] = [
    {  # nested objects, an enum, an array of strings
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "role": {"enum": ["admin", "user", "guest"]},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 6},
                    "floor": {"type": "integer", "minimum": 0, "maximum": 9},
                },
                "required": ["city", "floor"],
                "additionalProperties": False,
            },
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
            "active": {"type": "boolean"},
        },
        "required": ["name", "role", "address", "tags", "active"],
        "additionalProperties": False,
    },
    {  # an array of objects
        "type": "object",
        "properties": {
            "order": {"type": "array", "items": ITEM, "minItems": 1, "maxItems": 3},
            "paid": {"type": "boolean"},
        },
        "required": ["order", "paid"],
        "additionalProperties": False,
    },
    {  # arrays of arrays of enums, a nullable field
        "type": "object",
        "properties": {
            "grid": {
                "type": "array",
                "items": {"type": "array", "items": {"enum": [0, 1]}, "maxItems": 3},
                "maxItems": 3,
            },
            "label": {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "null"}]},
        },
        "required": ["grid", "label"],
        "additionalProperties": False,
    },
]
REGEX = r"(\+[0-9]{1,3} )?[0-9]{3}-[0-9]{4}"
CHOICES = ["positive", "negative", "neutral", "mixed feelings"]


@pytest.fixture(scope="module")
def split(llama_dir: Path) -> Iterator[LocalCluster]:
    with LocalCluster(
        ClusterSpec(model_dir=llama_dir, prefill=1, decode=1, grpc_port=0, http_port=0)
    ) as running:
        yield running


@pytest.fixture(scope="module")
def model(llama_dir: Path) -> str:
    return llama_dir.name


def run_all(cluster: LocalCluster, requests: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(text, finish_reason) of each chat request, sent BATCH at a time."""

    async def main() -> list[tuple[str, str]]:
        client = openai.AsyncOpenAI(
            base_url=f"http://{cluster.http_address}/v1", api_key="none", max_retries=0, timeout=120
        )
        results: list[tuple[str, str]] = []
        async with client:
            for start in range(0, len(requests), BATCH):
                batch = requests[start : start + BATCH]
                done = await asyncio.gather(*(client.chat.completions.create(**r) for r in batch))
                results += [(c.choices[0].message.content or "", c.choices[0].finish_reason) for c in done]
        return results

    return asyncio.run(main())


def chat(model: str, seed: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": f"Give me record number {seed}."}],
        "max_tokens": MAX_TOKENS,
        "temperature": 1.0,
        "seed": seed,
        **extra,
    }


def json_schema_format(schema: dict[str, Any], index: int) -> dict[str, Any]:
    return {
        "type": "json_schema",
        "json_schema": {"name": f"record{index}", "schema": schema, "strict": True},
    }


def test_100_json_schema_requests_in_split_mode_all_validate(split: LocalCluster, model: str) -> None:
    requests = [
        chat(
            model, seed, response_format=json_schema_format(SCHEMAS[seed % len(SCHEMAS)], seed % len(SCHEMAS))
        )
        for seed in range(100)
    ]
    results = run_all(split, requests)
    for seed, (text, finish) in enumerate(results):
        assert finish == "stop", (seed, text)
        jsonschema.validate(json.loads(text), SCHEMAS[seed % len(SCHEMAS)])
    assert len({text for text, _ in results}) > 50  # sampled: the seeds make different records
    assert routed(split) == {"pair": 100}  # every one went through the prefill -> decode hand-over


def routed(cluster: LocalCluster) -> dict[str, int]:
    """Finished requests by route ("pair" or "colocated"), from the router's /metrics."""
    with urllib.request.urlopen(f"http://{cluster.http_address}/metrics", timeout=30) as response:
        text = response.read().decode()
    counts: dict[str, int] = {}
    for match in re.finditer(
        r'^splitserve:e2e_request_latency_seconds_count\{[^}]*route="(\w+)"[^}]*\} (\S+)$', text, re.M
    ):
        counts[match[1]] = counts.get(match[1], 0) + int(float(match[2]))
    return counts


def test_guided_regex_choice_json_and_grammar_in_split_mode(split: LocalCluster, model: str) -> None:
    requests = [chat(model, seed, extra_body={"guided_regex": REGEX}) for seed in range(30)]
    requests += [chat(model, seed, extra_body={"guided_choice": CHOICES}) for seed in range(30)]
    requests += [chat(model, seed, extra_body={"guided_json": SCHEMAS[1]}) for seed in range(10)]
    requests += [
        chat(model, seed, extra_body={"guided_grammar": 'root ::= "on" | "off"'}) for seed in range(10)
    ]
    results = run_all(split, requests)
    assert all(finish == "stop" for _, finish in results), results
    texts = [text for text, _ in results]
    assert all(re.fullmatch(REGEX, t) for t in texts[:30]), texts[:30]
    assert all(t in CHOICES for t in texts[30:60]) and len(set(texts[30:60])) > 1, texts[30:60]
    for text in texts[60:70]:
        jsonschema.validate(json.loads(text), SCHEMAS[1])
    assert set(texts[70:]) <= {"on", "off"}


def test_json_object_and_completions_endpoint(split: LocalCluster, model: str) -> None:
    client = openai.OpenAI(
        base_url=f"http://{split.http_address}/v1", api_key="none", max_retries=0, timeout=120
    )
    out = client.completions.create(
        model=model, prompt="Record:", max_tokens=MAX_TOKENS, temperature=1.0, seed=3,
        extra_body={"response_format": json_schema_format(SCHEMAS[0], 0)},
    )  # fmt: skip
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].text), SCHEMAS[0])
    # Streaming: the deltas together are the constrained text.
    stream = client.chat.completions.create(
        **chat(model, 4, response_format=json_schema_format(SCHEMAS[2], 2), stream=True)
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), SCHEMAS[2])


def test_bad_constraints_are_400s_naming_the_field(split: LocalCluster, model: str) -> None:
    client = openai.OpenAI(
        base_url=f"http://{split.http_address}/v1", api_key="none", max_retries=0, timeout=120
    )
    cases: list[tuple[dict[str, Any], str]] = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        ({"extra_body": {"guided_choice": "yes"}}, "guided_choice"),
        ({"extra_body": {"guided_json": 5}}, "guided_json"),
        ({"extra_body": {"guided_regex": REGEX, "guided_choice": CHOICES}}, "guided_choice"),
        ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": REGEX}}, "guided_regex"),
    ]
    for extra, field in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(**chat(model, 0, max_tokens=4, **extra))
        assert info.value.body["param"] == field, info.value.body  # type: ignore[index]
    # Well-formed but not compilable: the node's compiler refuses it, and the 400 says which kind of constraint.
    for extra, kind in (
        ({"guided_regex": "[a-"}, "regex"),
        ({"guided_grammar": "root ::= nothing"}, "grammar"),
    ):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(**chat(model, 0, max_tokens=4, extra_body=extra))
        assert kind in info.value.body["message"], info.value.body  # type: ignore[index]


def test_colocated_node_honours_constraints(llama_dir: Path, model: str) -> None:
    spec = ClusterSpec(model_dir=llama_dir, prefill=0, decode=0, colocated=1, grpc_port=0, http_port=0)
    with LocalCluster(spec) as cluster:
        requests = [
            chat(model, s, response_format=json_schema_format(SCHEMAS[s % 3], s % 3)) for s in range(15)
        ]
        requests += [chat(model, s, extra_body={"guided_choice": CHOICES}) for s in range(5)]
        results = run_all(cluster, requests)
        assert routed(cluster) == {"colocated": len(requests)}
    for seed, (text, finish) in enumerate(results[:15]):
        assert finish == "stop", (seed, text)
        jsonschema.validate(json.loads(text), SCHEMAS[seed % 3])
    assert all(finish == "stop" and text in CHOICES for text, finish in results[15:]), results[15:]
