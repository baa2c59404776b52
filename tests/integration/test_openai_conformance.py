"""What real clients send, against a live split cluster: honoured fields work, every other one is a 400 naming it.

Also the endpoints clients probe (/health, /version, /v1/models/{id}, /tokenize, /detokenize), CORS, and gRPC
reflection under its v1 name (what grpcurl asks for first).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from grpc_reflection.v1alpha import reflection_pb2

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from ops.launcher import ClusterSpec, LocalCluster
from router.openai_fields import UNSUPPORTED
from tests.hf_reference import load_reference, reference_logprobs

pytestmark = pytest.mark.timeout(300)
KEY = "conformance-key"
ORIGIN = "https://ui.example"


@pytest.fixture(scope="module")
def cluster(llama_dir: Path) -> Iterator[LocalCluster]:
    spec = ClusterSpec(
        model_dir=llama_dir, prefill=1, decode=1, grpc_port=0, http_port=0, api_key=KEY,
        router_args=["--cors-allow-origin", ORIGIN],
    )  # fmt: skip
    with LocalCluster(spec) as running:
        yield running


@pytest.fixture(scope="module")
def client(cluster: LocalCluster) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://{cluster.http_address}/v1", api_key=KEY, max_retries=0, timeout=120
    )


@pytest.fixture(scope="module")
def model(llama_dir: Path) -> str:
    return llama_dir.name


def http(
    cluster: LocalCluster, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://{cluster.http_address}{path}", data=data, method=method,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}", **(headers or {})},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_every_unsupported_field_with_a_value_is_a_400_naming_it(cluster: LocalCluster, model: str) -> None:
    # "bogus" is neutral for no field, so each one must be refused, on both endpoints, naming the field.
    for path, base in (
        ("/v1/completions", {"model": model, "prompt": "Hello", "max_tokens": 2}),
        (
            "/v1/chat/completions",
            {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        ),
    ):
        for name in UNSUPPORTED:
            status, _, raw = http(cluster, "POST", path, {**base, name: "bogus"})
            error = json.loads(raw)["error"]
            assert status == 400, (path, name, raw)
            assert error["param"] == name and name in error["message"], (path, name, error)
        status, _, raw = http(cluster, "POST", path, {**base, "max_token": 5})
        assert status == 400 and json.loads(raw)["error"]["param"] == "max_token"


def test_the_openai_client_gets_400s_for_what_it_offers_and_we_do_not_honour(
    client: openai.OpenAI, model: str
) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    chat_cases: dict[str, dict[str, Any]] = {
        # tools are honoured (tests/integration/test_tool_calling.py); ones that are not functions are refused.
        "tools": {"tools": [{"type": "code_interpreter"}]},
        "tool_choice": {"tools": [], "tool_choice": "required"},
        # response_format is honoured now (tests/integration/test_structured_output.py); one it cannot serve is refused.
        "response_format": {"response_format": {"type": "json_schema", "json_schema": {"name": "no-schema"}}},
    }
    for name, extra in chat_cases.items():
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=model, messages=messages, max_tokens=2, **extra)  # type: ignore[call-overload]
        assert info.value.body["param"] == name, info.value.body  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model, prompt="Hello", max_tokens=2, suffix="end")
    assert info.value.body["param"] == "suffix", info.value.body  # type: ignore[index]


def test_neutral_values_of_unsupported_fields_are_accepted(client: openai.OpenAI, model: str) -> None:
    out = client.completions.create(
        model=model, prompt="Hello", max_tokens=3, echo=False, best_of=1, suffix=None, logit_bias={},
        user="alice", temperature=0,
    )  # fmt: skip
    assert out.choices[0].finish_reason in ("length", "stop")
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, tools=[], tool_choice="none",
        response_format={"type": "text"}, store=False, temperature=0,
    )  # fmt: skip
    assert chat.choices[0].message.role == "assistant"


def test_stop_token_ids_stop_generation(client: openai.OpenAI, model: str, llama_dir: Path) -> None:
    prompt = [5, 17, 99, 300, 42, 7]
    [free] = LLMEngine(llama_dir, EngineConfig(num_kv_blocks=32)).generate(
        [prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    )
    stop_id = free.token_ids[3]
    first = free.token_ids.index(stop_id)  # it may come earlier too
    stopped = client.completions.create(
        model=model, prompt=prompt, max_tokens=8, temperature=0,
        extra_body={"ignore_eos": True, "stop_token_ids": [stop_id]},
    )  # fmt: skip
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage is not None and stopped.usage.completion_tokens == first + 1


def test_max_tokens_beyond_the_context_is_a_400(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model, prompt="Hello", max_tokens=10**6)
    assert info.value.body["param"] == "max_tokens"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=10**6
        )
    assert info.value.body["param"] == "max_completion_tokens"  # type: ignore[index]


def test_probe_and_model_endpoints(cluster: LocalCluster, client: openai.OpenAI, model: str) -> None:
    status, _, raw = http(cluster, "GET", "/health", headers={"Authorization": ""})
    assert status == 200 and raw == b""
    status, _, raw = http(cluster, "GET", "/version", headers={"Authorization": ""})
    assert status == 200 and json.loads(raw)["version"]
    entry = client.models.retrieve(model)
    assert entry.id == model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_tokenize_and_detokenize_agree_with_the_model_tokenizer(
    cluster: LocalCluster, llama_dir: Path
) -> None:
    tokenizer = Tokenizer.from_dir(llama_dir)
    text = "The cluster serves tokens."
    status, _, raw = http(cluster, "POST", "/tokenize", {"prompt": text})
    answer = json.loads(raw)
    assert (
        status == 200
        and answer["tokens"] == tokenizer.encode(text)
        and answer["count"] == len(answer["tokens"])
    )
    assert answer["max_model_len"] > 0
    status, _, raw = http(cluster, "POST", "/detokenize", {"tokens": answer["tokens"]})
    assert status == 200 and json.loads(raw)["prompt"] == tokenizer.decode(answer["tokens"])
    messages = [{"role": "user", "content": "Hi"}]
    status, _, raw = http(cluster, "POST", "/tokenize", {"messages": messages})
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert status == 200 and json.loads(raw)["tokens"] == tokenizer.encode(rendered, add_special_tokens=False)
    status, _, raw = http(cluster, "POST", "/detokenize", {"tokens": [-1]})
    assert status == 400 and json.loads(raw)["error"]["param"] == "tokens"
    status, _, raw = http(
        cluster, "POST", "/tokenize", {"prompt": text}, headers={"Authorization": "Bearer wrong"}
    )
    assert status == 401


def test_cors_preflight_and_headers(cluster: LocalCluster, model: str) -> None:
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}  # fmt: skip
    status, headers, _ = http(
        cluster, "OPTIONS", "/v1/chat/completions", headers={**preflight, "Authorization": ""}
    )
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "authorization" in headers["Access-Control-Allow-Headers"].lower()
    status, headers, raw = http(
        cluster, "OPTIONS", "/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"}
    )
    assert status == 403 and "Access-Control-Allow-Origin" not in headers
    assert "--cors-allow-origin" in json.loads(raw)["error"]["message"]
    body = {"model": model, "prompt": "Hello", "max_tokens": 2, "stream": True}
    status, headers, raw = http(cluster, "POST", "/v1/completions", body, headers={"Origin": ORIGIN})
    assert (
        status == 200
        and headers["Access-Control-Allow-Origin"] == ORIGIN
        and raw.endswith(b"data: [DONE]\n\n")
    )


def test_grpc_reflection_v1_describes_the_inference_service(cluster: LocalCluster) -> None:
    with grpc.insecure_channel(cluster.router_address) as channel:
        for service in ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"):
            call = channel.stream_stream(
                f"/{service}/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            requests = [
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="splitserve.v1.Inference"),
            ]
            listed, described = list(call(iter(requests), timeout=10))
            names = {s.name for s in listed.list_services_response.service}
            assert "splitserve.v1.Inference" in names, service
            assert described.file_descriptor_response.file_descriptor_proto, service


# ---- lm-evaluation-harness's requests: batches of token-id prompts, echo with logprobs, max_tokens 0 ----------------


def test_a_batch_of_prompts_returns_one_choice_per_prompt_and_n(
    client: openai.OpenAI, model: str, llama_dir: Path
) -> None:
    prompts = [[5, 17, 99, 300], [42, 7, 8, 9, 10, 11], [600, 601]]
    expected = LLMEngine(llama_dir, EngineConfig(num_kv_blocks=32)).generate(
        prompts, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    )
    out = client.completions.create(
        model=model, prompt=prompts, max_tokens=5, n=2, temperature=0, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in out.choices] == list(range(6))
    for choice in out.choices:
        assert choice.text == expected[choice.index // 2].text, choice.index
    assert out.usage is not None and out.usage.prompt_tokens == sum(len(p) for p in prompts)
    assert out.usage.completion_tokens == 6 * 5


def test_echo_scores_the_prompt_as_transformers_does(
    client: openai.OpenAI, model: str, llama_dir: Path
) -> None:
    reference = load_reference(llama_dir)
    prompts = [[5, 17, 99, 300, 42, 7, 8], [600, 601, 602, 3, 4]]
    for max_tokens in (0, 1):
        out = client.completions.create(
            model=model, prompt=prompts, max_tokens=max_tokens, logprobs=1, echo=True, temperature=0
        )
        for choice, prompt in zip(out.choices, prompts, strict=True):
            logprobs = choice.logprobs
            assert (
                logprobs is not None
                and logprobs.token_logprobs is not None
                and logprobs.top_logprobs is not None
            )
            assert len(logprobs.token_logprobs) == len(prompt) + max_tokens
            assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
            rows = reference_logprobs(reference, prompt[:1], prompt[1:])
            for position, token in enumerate(prompt[1:], start=1):
                expected = rows[position - 1, token].item()
                assert abs(logprobs.token_logprobs[position] - expected) < 1e-3, (position, expected)
                top = logprobs.top_logprobs[position]
                assert top is not None and len(top) == 1
                assert abs(next(iter(top.values())) - rows[position - 1].max().item()) < 1e-3
        assert out.usage is not None and out.usage.completion_tokens == len(prompts) * max_tokens


def test_echo_returns_the_prompt_text_first(client: openai.OpenAI, model: str) -> None:
    out = client.completions.create(model=model, prompt="The cluster", max_tokens=3, echo=True, temperature=0)
    plain = client.completions.create(model=model, prompt="The cluster", max_tokens=3, temperature=0)
    assert out.choices[0].text == "The cluster" + plain.choices[0].text
    chunks = list(
        client.completions.create(
            model=model, prompt="The cluster", max_tokens=3, echo=True, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == out.choices[0].text


def test_vllm_prompt_logprobs(client: openai.OpenAI, model: str) -> None:
    prompt = [5, 17, 99, 300]
    out = client.completions.create(
        model=model, prompt=prompt, max_tokens=1, temperature=0, extra_body={"prompt_logprobs": 2}
    )
    entries = out.choices[0].model_extra["prompt_logprobs"]  # type: ignore[index]
    assert entries[0] is None and len(entries) == len(prompt)
    for position, entry in enumerate(entries[1:], start=1):
        assert str(prompt[position]) in entry
        assert len(entry) <= 3  # the prompt's token and its 2 alternatives (it may be one of them)


def test_best_of_returns_the_candidate_with_the_highest_cumulative_logprob(
    client: openai.OpenAI, model: str
) -> None:
    common: dict[str, Any] = {
        "model": model,
        "prompt": "The cluster",
        "max_tokens": 6,
        "temperature": 1.0,
        "seed": 11,
    }
    candidates = client.completions.create(n=3, logprobs=0, **common)
    totals = {c.text: sum(c.logprobs.token_logprobs or []) for c in candidates.choices if c.logprobs}
    best = client.completions.create(n=1, best_of=3, **common)
    assert len(best.choices) == 1 and best.choices[0].logprobs is None
    assert best.choices[0].text == max(totals, key=lambda text: totals[text])
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(n=2, best_of=1, **common)
    assert info.value.body["param"] == "best_of"  # type: ignore[index]


def test_logit_bias_forces_a_token(client: openai.OpenAI, model: str, llama_dir: Path) -> None:
    tokenizer = Tokenizer.from_dir(llama_dir)
    target = tokenizer.encode(" cache", add_special_tokens=False)[0]
    out = client.completions.create(
        model=model, prompt="The cluster", max_tokens=4, temperature=0, logit_bias={str(target): 100},
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert out.choices[0].text == tokenizer.decode([target] * 4)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model, prompt="x", max_tokens=1, logit_bias={"5": 101})
    assert info.value.body["param"] == "logit_bias"  # type: ignore[index]
