"""POST /v1/responses on a live split cluster, through the openai client: the same text as a chat completion of the
same conversation (same template, greedy), streamed as the SDK's typed events, and a 400 naming what it cannot do."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from ops.launcher import ClusterSpec, LocalCluster

pytestmark = pytest.mark.timeout(300)
QUESTION = "Name a colour."


@pytest.fixture(scope="module")
def cluster(llama_dir: Path) -> Iterator[LocalCluster]:
    spec = ClusterSpec(model_dir=llama_dir, prefill=1, decode=1, grpc_port=0, http_port=0)
    with LocalCluster(spec) as running:
        yield running


@pytest.fixture(scope="module")
def client(cluster: LocalCluster) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://{cluster.http_address}/v1", api_key="unused", max_retries=0, timeout=120
    )


@pytest.fixture(scope="module")
def model(llama_dir: Path) -> str:
    return llama_dir.name


def chat_text(
    client: openai.OpenAI, model: str, messages: list[dict[str, str]], max_tokens: int
) -> tuple[str, str]:
    out = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)  # type: ignore[arg-type]
    choice = out.choices[0]
    return choice.message.content or "", choice.finish_reason


def test_a_text_input_answers_what_chat_answers_for_the_same_user_message(
    client: openai.OpenAI, model: str
) -> None:
    response = client.responses.create(model=model, input=QUESTION, max_output_tokens=8, temperature=0)
    expected, finish = chat_text(client, model, [{"role": "user", "content": QUESTION}], 8)
    assert response.object == "response" and response.id.startswith("resp_")
    [message] = response.output
    assert message.type == "message" and message.role == "assistant"
    [part] = message.content
    assert part.type == "output_text" and part.text == expected and expected
    usage = response.usage
    assert usage is not None and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    # Cut by length: "incomplete" with OpenAI's reason; otherwise the model ended on its own.
    if finish == "length":
        assert response.status == "incomplete" and usage.output_tokens == 8
        assert response.incomplete_details is not None
        assert response.incomplete_details.reason == "max_output_tokens"
    else:
        assert response.status == "completed" and response.incomplete_details is None


def test_instructions_and_message_items_are_the_chat_conversation(client: openai.OpenAI, model: str) -> None:
    response = client.responses.create(
        model=model,
        instructions="You answer in French.",
        input=[
            {"role": "user", "content": "Hi"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello."}]},
            {"role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
        ],
        max_output_tokens=8,
        temperature=0,
    )
    expected, _ = chat_text(
        client,
        model,
        [
            {"role": "system", "content": "You answer in French."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": QUESTION},
        ],
        8,
    )
    assert response.output[0].content[0].text == expected  # type: ignore[union-attr]
    plain = client.responses.create(model=model, input=QUESTION, max_output_tokens=8, temperature=0)
    assert response.usage is not None and plain.usage is not None
    assert (
        response.usage.input_tokens > plain.usage.input_tokens
    )  # the system message and turns were rendered


def test_streamed_deltas_join_to_the_same_text_and_end_with_the_final_response(
    client: openai.OpenAI, model: str
) -> None:
    whole = client.responses.create(model=model, input=QUESTION, max_output_tokens=8, temperature=0)
    events = list(
        client.responses.create(model=model, input=QUESTION, max_output_tokens=8, temperature=0, stream=True)
    )
    types = [e.type for e in events]
    final = f"response.{whole.status}"  # response.completed, or response.incomplete when cut by length
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        final,
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    text = whole.output[0].content[0].text  # type: ignore[union-attr]
    assert deltas and "".join(deltas) == text
    last = events[-1].response  # type: ignore[union-attr]
    assert last.status == whole.status and last.output[0].content[0].text == text
    assert last.usage is not None and last.usage.output_tokens == whole.usage.output_tokens  # type: ignore[union-attr]


def test_a_request_the_server_cannot_honour_is_a_400_naming_the_field(
    client: openai.OpenAI, model: str
) -> None:
    tool = {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}
    for kwargs, field in (
        ({"tools": [tool]}, "tools"),
        ({"store": True}, "store"),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"reasoning": {"effort": "low"}}, "reasoning"),
        ({"extra_body": {"max_output_token": 5}}, "max_output_token"),  # a typo
    ):
        with pytest.raises(openai.BadRequestError) as info:
            client.responses.create(model=model, input=QUESTION, max_output_tokens=4, **kwargs)  # type: ignore[arg-type]
        assert info.value.param == field and field in info.value.message, kwargs
    # chat's own checks, named with this API's fields
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=model, input=QUESTION, max_output_tokens=10**6)
    assert info.value.param == "max_output_tokens" and "max_output_tokens" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=model, input=[{"role": "tool", "content": "x"}])  # type: ignore[list-item]
    assert info.value.param == "input"
    # neutral values ask for nothing and pass
    ok = client.responses.create(
        model=model, input=QUESTION, max_output_tokens=2, store=False, tools=[], metadata={}, truncation="disabled",
        text={"format": {"type": "text"}},
    )  # fmt: skip
    assert ok.status in ("completed", "incomplete") and ok.usage is not None and ok.usage.output_tokens > 0


def test_an_unknown_model_is_a_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="no-such-model", input=QUESTION, max_output_tokens=2)
