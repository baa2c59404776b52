"""A real cluster (embedded Redis, router, colocated nodes as OS processes): tokens, errors, reflection, routers."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams
from ops.launcher import ClusterSpec, LocalCluster
from tests.integration.cluster_client import generate_many, status_of

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cluster(llama_dir: Path) -> Iterator[LocalCluster]:
    spec = ClusterSpec(
        model_dir=llama_dir, prefill=0, decode=0, colocated=2, routers=2, grpc_port=0, http_port=0
    )
    with LocalCluster(spec) as running:
        yield running


def mixed_prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 1000) for _ in range(rng.choice([1, 7, 30, 90, 200]))] for _ in range(n)]


def test_streamed_tokens_equal_the_single_process_engine(cluster: LocalCluster, llama_dir: Path) -> None:
    prompts = mixed_prompts(24)
    expected = LLMEngine(llama_dir, EngineConfig(num_kv_blocks=256)).generate(
        prompts, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    )
    results = generate_many(cluster.router_address, prompts, max_tokens=20, temperature=0.0, ignore_eos=True)
    assert [r.token_ids for r in results] == [c.token_ids for c in expected]
    assert all(r.finish_reason == 2 and r.usage and r.usage.completion_tokens == 20 for r in results)
    assert all(r.usage and r.usage.ttft_seconds > 0 for r in results)


def test_both_routers_serve(cluster: LocalCluster) -> None:
    for router in cluster.by_role("router"):
        [result] = generate_many(router.address, [[5, 6, 7]], max_tokens=4, temperature=0.0)
        assert len(result.token_ids) == 4


@pytest.mark.parametrize(
    ("prompt", "sampling", "fragment"),
    [
        ("", {}, "prompt is empty"),
        ([], {}, "prompt is empty"),
        ([5] * 3000, {}, "the model's context is"),
        ([5, 10**6], {}, "outside the vocabulary"),
        ([5, 6], {"top_p": 0.0}, "top_p must be in (0, 1]"),
        ([5, 6], {"temperature": -1.0}, "temperature must be >= 0"),
        ([5, 6], {"max_tokens": 0}, "max_tokens must be >= 1"),
    ],
)
def test_bad_input_is_invalid_argument_with_a_message(
    cluster: LocalCluster, prompt, sampling, fragment
) -> None:
    code, details = status_of(cluster.router_address, prompt, **sampling)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and fragment in details


def test_a_generic_reflection_client_can_call_generate(cluster: LocalCluster) -> None:
    """No generated stubs: discover the service and message types through server reflection, as grpcurl does."""
    channel = grpc.insecure_channel(cluster.router_address)
    try:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "splitserve.v1.Inference" in database.get_services()
        pool = descriptor_pool.DescriptorPool(database)
        method = pool.FindServiceByName("splitserve.v1.Inference").FindMethodByName("Generate")
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        request = request_cls(text="Hello there")
        request.sampling.max_tokens = 5
        request.sampling.temperature = 0.0
        call = channel.unary_stream(
            "/splitserve.v1.Inference/Generate",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_cls.FromString,
        )
        tokens = [t for msg in call(request, timeout=60) for t in msg.token_ids]
        assert len(tokens) == 5
    finally:
        channel.close()


def test_no_nodes_is_unavailable_quickly(llama_dir: Path) -> None:
    spec = ClusterSpec(model_dir=llama_dir, prefill=0, decode=0, colocated=0, grpc_port=0, http_port=0)
    with LocalCluster(spec) as empty:
        started = time.monotonic()
        code, details = status_of(empty.router_address, [5, 6, 7], max_tokens=3)
        assert code == grpc.StatusCode.UNAVAILABLE and "no node could serve" in details
        # It says why, so an operator can tell an empty pool from a full one.
        assert "usable nodes per pool: prefill 0/0, decode 0/0, colocated 0/0" in details
        # Not a performance bound: it shows the router answers at once instead of waiting out RPC deadlines (60 s).
        assert time.monotonic() - started < 10.0
