"""Prometheus /metrics of every component of a live split cluster (router, prefill, decode and colocated
nodes), after real gRPC and HTTP traffic.

Each scrape is parsed with prometheus_client's own parser; the counts must match the traffic the test sent: one
TTFT, E2E and KV transfer observation per request, one inter-token gap per token after the first.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ops.launcher import ClusterSpec, LocalCluster, Process
from tests.integration.cluster_client import generate

pytestmark = pytest.mark.timeout(120)
BLOCK_SIZE = 16  # the nodes' default --block-size
# (prompt tokens, max tokens) per gRPC request; 600 tokens is past --one-piece-below (512): a layer-wise transfer.
GRPC_REQUESTS = [(40, 5), (600, 3), (17, 9)]
HTTP_REQUESTS = [(25, 4), (33, 6)]  # the second one streamed
NODE_GAUGES = (
    "splitserve:queued_prompt_tokens",
    "splitserve:running_requests",
    "splitserve:waiting_requests",
    "splitserve:kv_blocks_used",
    "splitserve:kv_blocks_free",
)


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


@dataclass(frozen=True)
class Traffic:
    requests: int
    tokens: int  # tokens delivered to clients, over all requests
    prompt_tokens: list[int]


@pytest.fixture(scope="module")
def cluster(llama_dir: Path) -> Iterator[LocalCluster]:
    spec = ClusterSpec(
        model_dir=llama_dir,
        prefill=1,
        decode=1,
        colocated=1,  # idle (the router places on a pair while one exists), but it serves metrics all the same
        grpc_port=0,
        http_port=0,
        role_args={"prefill": ["--machine-type", "dgx-h100"]},
    )
    with LocalCluster(spec) as running:
        yield running


@pytest.fixture(scope="module")
def traffic(cluster: LocalCluster, llama_dir: Path) -> Traffic:
    """Served requests over both endpoints, and one the decode node refuses (a bad temperature)."""
    tokens = 0
    for i, (prompt_len, max_tokens) in enumerate(GRPC_REQUESTS):
        result = asyncio.run(
            generate(cluster.router_address, prompt(prompt_len, i), max_tokens=max_tokens, ignore_eos=True)
        )
        assert len(result.token_ids) == max_tokens
        tokens += len(result.token_ids)
    client = openai.OpenAI(
        base_url=f"http://{cluster.http_address}/v1", api_key="x", max_retries=0, timeout=60
    )
    (whole_len, whole_max), (streamed_len, streamed_max) = HTTP_REQUESTS
    whole = client.completions.create(
        model=llama_dir.name,
        prompt=prompt(whole_len, 10),
        max_tokens=whole_max,
        extra_body={"ignore_eos": True},
    )
    assert whole.usage is not None
    tokens += whole.usage.completion_tokens
    chunks = list(
        client.completions.create(
            model=llama_dir.name,
            prompt=prompt(streamed_len, 11),
            max_tokens=streamed_max,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    usage = chunks[-1].usage
    assert usage is not None
    tokens += usage.completion_tokens
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        asyncio.run(generate(cluster.router_address, prompt(10), max_tokens=3, temperature=-1.0))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    lengths = [n for n, _ in GRPC_REQUESTS + HTTP_REQUESTS]
    return Traffic(requests=len(lengths), tokens=tokens, prompt_tokens=lengths)


def prompt(length: int, first: int = 0) -> list[int]:
    """Prompts with different `first` share no prefix: every block of each crosses to the decode node (one that
    holds a prompt's first blocks already receives only the rest)."""
    return [3 + (first * 37 + i) % 500 for i in range(length)]


def scrape(address: str) -> list[Sample]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return [
        Sample(s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of `name` over every label set that includes `labels`; fails when there is none."""
    values = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    assert values, f"no {name} with {labels}"
    return sum(values)


def node_labels(proc: Process, machine_type: str) -> dict[str, str]:
    return {"role": proc.role, "node": proc.node_id, "machine_type": machine_type}


def test_router_histograms_count_every_request_and_token(
    cluster: LocalCluster, traffic: Traffic, llama_dir: Path
) -> None:
    samples = scrape(cluster.by_role("router")[0].metrics_address)
    pair = {"model": llama_dir.name, "route": "pair"}
    assert total(samples, "splitserve:time_to_first_token_seconds_count", **pair) == traffic.requests
    assert total(samples, "splitserve:e2e_request_latency_seconds_count", **pair) == traffic.requests
    inter_token = total(samples, "splitserve:inter_token_latency_seconds_count", **pair)
    assert inter_token == traffic.tokens - traffic.requests
    # Every request's first token came before its last, and every gap lies between them.
    ttft_sum = total(samples, "splitserve:time_to_first_token_seconds_sum", **pair)
    e2e_sum = total(samples, "splitserve:e2e_request_latency_seconds_sum", **pair)
    itl_sum = total(samples, "splitserve:inter_token_latency_seconds_sum", **pair)
    assert 0 < ttft_sum < e2e_sum
    assert 0 < itl_sum <= e2e_sum - ttft_sum + 1e-6
    assert total(samples, "splitserve:requests_total", outcome="ok") == traffic.requests
    assert total(samples, "splitserve:requests_total", outcome="invalid_argument") == 1
    # Energy and cost histograms count the same finished requests (one observation per phase each).
    assert total(samples, "splitserve:request_energy_joules_count", phase="decode") == traffic.requests
    roles = {s.labels["role"] for s in samples if s.name == "splitserve:node_power_watts"}
    assert roles == {"prefill", "decode", "colocated"}


def test_prefill_node_times_each_kv_transfer(
    cluster: LocalCluster, traffic: Traffic, llama_dir: Path
) -> None:
    prefill = cluster.by_role("prefill")[0]
    samples = scrape(prefill.metrics_address)
    labels = node_labels(prefill, "dgx-h100")
    assert total(samples, "splitserve:kv_transfer_seconds_count", **labels) == traffic.requests
    assert total(samples, "splitserve:kv_transfer_seconds_sum", **labels) > 0
    # Every prompt block of every layer crossed at least once, and none more than twice (a block split across two
    # prompt chunks is sent after each; the completion notice rides on one more block).
    config = json.loads((llama_dir / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    dtype = config.get("torch_dtype") or config["dtype"]  # newer transformers write "dtype"
    element_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    block_bytes = 2 * BLOCK_SIZE * config["num_key_value_heads"] * head_dim * element_bytes
    blocks = sum(-(-n // BLOCK_SIZE) for n in traffic.prompt_tokens)
    sent = total(samples, "splitserve:kv_transfer_bytes_total", **labels)
    least = blocks * config["num_hidden_layers"] * block_bytes
    assert least <= sent <= 2 * least


def test_every_node_reports_load_preemptions_and_power(cluster: LocalCluster, traffic: Traffic) -> None:
    machine_types = {"prefill": "dgx-h100", "decode": "cpu", "colocated": "cpu"}
    for proc in cluster.by_role("prefill") + cluster.by_role("decode") + cluster.by_role("colocated"):
        samples = scrape(proc.metrics_address)
        labels = node_labels(proc, machine_types[proc.role])
        for gauge in NODE_GAUGES:
            assert total(samples, gauge, **labels) >= 0
        assert total(samples, "splitserve:kv_blocks_free", **labels) > 0
        assert total(samples, "splitserve:preemptions_total", **labels) == 0  # a tiny load, a roomy KV pool
        assert total(samples, "splitserve:node_power_watts", source="modeled", **labels) > 0
        has_transfers = any(s.name.startswith("splitserve:kv_transfer") for s in samples)
        assert has_transfers == (proc.role == "prefill")
