"""The official `openai` client against a real split cluster's HTTP endpoint (router + prefill + decode processes)."""

from __future__ import annotations

import asyncio
import http.client
import json
import random
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams
from ops.launcher import ClusterSpec, LocalCluster
from tests.integration.cluster_client import generate
from tests.integration.test_cluster_disaggregated import assert_pools_drain

pytestmark = pytest.mark.timeout(300)
KEY = "test-key-123"


@pytest.fixture(scope="module")
def cluster(llama_dir: Path) -> Iterator[LocalCluster]:
    spec = ClusterSpec(model_dir=llama_dir, prefill=1, decode=1, grpc_port=0, http_port=0, api_key=KEY)
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


def ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 1000) for _ in range(n)]


GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


def test_completion_matches_the_engine_and_streaming_matches_non_streaming(
    client: openai.OpenAI, model: str, llama_dir: Path
) -> None:
    prompt = ids(30, seed=1)
    [expected] = LLMEngine(llama_dir, EngineConfig(num_kv_blocks=64)).generate(
        [prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    )
    full = client.completions.create(model=model, prompt=prompt, max_tokens=12, **GREEDY)
    assert full.choices[0].text == expected.text
    assert full.choices[0].finish_reason == "length"
    assert full.usage is not None and full.usage.completion_tokens == 12 and full.usage.prompt_tokens == 30
    chunks = list(
        client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12


def test_chat_streaming_and_not(client: openai.OpenAI, model: str) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    full = client.chat.completions.create(model=model, messages=messages, max_tokens=10, **GREEDY)  # type: ignore[arg-type]
    text = full.choices[0].message.content
    assert text and full.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=10, stream=True, **GREEDY
    )  # type: ignore[arg-type]
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text


def test_max_completion_tokens_and_stop_strings(client: openai.OpenAI, model: str) -> None:
    prompt = ids(20, seed=2)
    text = client.completions.create(model=model, prompt=prompt, max_tokens=30, **GREEDY).choices[0].text
    assert len(text) > 10
    stop = text[5:8]
    cut = client.completions.create(model=model, prompt=prompt, max_tokens=30, stop=[stop], **GREEDY).choices[
        0
    ]
    assert cut.text == text[: text.index(stop)] and cut.finish_reason == "stop"
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=3, **GREEDY
    )
    assert chat.usage is not None and chat.usage.completion_tokens == 3


def test_seed_reproducibility_and_n_choices(client: openai.OpenAI, model: str) -> None:
    kwargs = dict(model=model, prompt=ids(15, seed=3), max_tokens=16, temperature=1.0, seed=42)
    a = client.completions.create(**kwargs)  # type: ignore[call-overload]
    b = client.completions.create(**kwargs)  # type: ignore[call-overload]
    assert a.choices[0].text == b.choices[0].text
    both = client.completions.create(n=2, **kwargs)  # type: ignore[call-overload]
    assert sorted(c.index for c in both.choices) == [0, 1]
    assert both.choices[0].text == a.choices[0].text  # choice 0 keeps the request's seed


def test_logprobs_match_the_engine(client: openai.OpenAI, model: str, llama_dir: Path) -> None:
    prompt = ids(25, seed=4)
    [expected] = LLMEngine(llama_dir, EngineConfig(num_kv_blocks=64)).generate(
        [prompt], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2)
    )
    out = client.completions.create(model=model, prompt=prompt, max_tokens=6, logprobs=2, **GREEDY)
    logprobs = out.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None and logprobs.top_logprobs is not None
    assert logprobs.token_logprobs == pytest.approx([lp.logprob for lp in expected.logprobs], abs=1e-4)
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        logprobs=True,
        top_logprobs=2,
        **GREEDY,
    )
    assert chat.choices[0].logprobs is not None and len(chat.choices[0].logprobs.content or []) == 3


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"max_tokens": -1}, "max_tokens must be >= 1"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"top_p": 1.5}, "top_p must be between"),
        ({"prompt": [5] * 3000}, "this model's context is"),
        ({"prompt": ""}, "prompt is empty"),
        ({"stop": 7}, "stop must be"),
    ],
)
def test_bad_requests_raise_typed_errors_and_the_server_keeps_serving(
    client: openai.OpenAI, model: str, kwargs: dict, fragment: str
) -> None:
    request = {"model": model, "prompt": [5, 6, 7], "max_tokens": 2, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**request)
    assert fragment in str(err.value)
    assert client.completions.create(model=model, prompt=[5, 6], max_tokens=2).choices[0].text is not None


def test_unknown_model_is_404_and_wrong_key_is_401(client: openai.OpenAI, cluster: LocalCluster) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    stranger = openai.OpenAI(base_url=f"http://{cluster.http_address}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.completions.create(model="m", prompt="hi", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        list(stranger.models.list())


def test_grpc_without_the_key_is_unauthenticated(cluster: LocalCluster) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(generate(cluster.router_address, [5, 6, 7], max_tokens=2))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def raw(cluster: LocalCluster, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    host, port = cluster.http_address.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request(
            method,
            path,
            body=body,
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        )
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def test_malformed_json_and_oversize_bodies_get_openai_shaped_errors(cluster: LocalCluster) -> None:
    status, body = raw(cluster, "POST", "/v1/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = raw(cluster, "POST", "/v1/completions", b'{"prompt": "' + b"x" * (9 * 1024 * 1024) + b'"}')
    assert status == 413 and body["error"]["type"] == "invalid_request_error"
    assert raw(cluster, "GET", "/healthz")[0] == 200
    assert raw(cluster, "GET", "/readyz")[0] == 200
    status, body = raw(cluster, "GET", "/v1/models")
    assert status == 200 and body["data"][0]["object"] == "model"


def test_client_disconnect_mid_stream_aborts_and_frees_kv(cluster: LocalCluster, model: str) -> None:
    host, port = cluster.http_address.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = {
        "model": model,
        "prompt": list(range(3, 100)),
        "max_tokens": 1500,
        "stream": True,
        "ignore_eos": True,
    }
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # the stream is flowing
    conn.close()  # the client goes away mid-stream
    assert_pools_drain(cluster, expected_nodes=2)
