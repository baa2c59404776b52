"""A real split cluster: embedded Redis, a router, 2 prefill and 2 decode nodes as OS processes, per KV backend."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cluster.state import ClusterView
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams
from ops.launcher import ClusterSpec, LocalCluster
from splitserve.v1 import inference_pb2 as pb
from splitserve.v1 import inference_pb2_grpc
from tests.integration.cluster_client import backend_available, generate_many, status_of

pytestmark = pytest.mark.timeout(600)
BACKENDS = ["torch", "nixl"]


@pytest.fixture(scope="module", params=BACKENDS)
def cluster(request: pytest.FixtureRequest, llama_dir: Path) -> Iterator[LocalCluster]:
    if not backend_available(request.param):
        pytest.skip(f"the {request.param} KV backend is not installed")
    spec = ClusterSpec(
        model_dir=llama_dir,
        prefill=2,
        decode=2,
        grpc_port=0,
        http_port=0,
        kv_backend=request.param,
        # Prompts under 64 tokens go in one piece, longer ones layer by layer: both paths run in every test.
        node_args=["--kv-cache-mb", "16", "--max-batched-tokens", "256", "--one-piece-below", "64"],
    )
    with LocalCluster(spec) as running:
        yield running


def mixed_prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 5, 16, 17, 40, 64, 120, 250]
    return [[rng.randrange(3, 1000) for _ in range(lengths[i % len(lengths)])] for i in range(n)]


def test_64_concurrent_streams_equal_the_single_process_engine(
    cluster: LocalCluster, llama_dir: Path
) -> None:
    prompts = mixed_prompts(64, seed=1)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    expected = LLMEngine(llama_dir, EngineConfig(num_kv_blocks=512)).generate(prompts, params)
    results = generate_many(cluster.router_address, prompts, max_tokens=16, temperature=0.0, ignore_eos=True)
    mismatched = [
        i for i, (r, c) in enumerate(zip(results, expected, strict=True)) if r.token_ids != c.token_ids
    ]
    assert not mismatched, f"{len(mismatched)} of 64 requests differ, e.g. #{mismatched[0]}"
    assert_pools_drain(cluster)


def test_seeded_sampling_survives_the_hand_over(cluster: LocalCluster, llama_dir: Path) -> None:
    prompts = mixed_prompts(4, seed=2)
    params = SamplingParams(max_tokens=12, temperature=1.0, top_k=40, seed=9, ignore_eos=True)
    expected = LLMEngine(llama_dir, EngineConfig(num_kv_blocks=128)).generate(prompts, params)
    sampling = dict(max_tokens=12, temperature=1.0, top_k=40, seed=9, ignore_eos=True)
    results = generate_many(cluster.router_address, prompts, **sampling)
    assert [r.token_ids for r in results] == [c.token_ids for c in expected]


def test_bad_sampling_is_invalid_argument_and_reserves_nothing(cluster: LocalCluster) -> None:
    code, details = status_of(cluster.router_address, [5, 6, 7], top_p=1.5)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in details
    assert_pools_drain(cluster)


def assert_pools_drain(cluster: LocalCluster, timeout_s: float = 10.0, expected_nodes: int = 4) -> None:
    """Every node's load report (from Redis) shows its whole KV pool free again."""
    view = ClusterView(cluster.redis_url)
    view.start()
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            loads = [s.load for s in view.nodes() if s.info.role in ("prefill", "decode")]
            if len(loads) == expected_nodes and all(
                load and load.free_kv_blocks == load.total_kv_blocks for load in loads
            ):
                return
            time.sleep(0.1)
        raise AssertionError(f"KV pools not free after {timeout_s} s: {[s.load for s in view.nodes()]}")
    finally:
        view.stop()


def test_client_cancel_mid_stream_aborts_on_both_nodes_and_frees_blocks(cluster: LocalCluster) -> None:
    async def cancel_after_tokens() -> int:
        request = pb.GenerateRequest(
            sampling=pb.SamplingParameters(max_tokens=1500, ignore_eos=True, temperature=0.0)
        )
        request.token_ids.ids.extend(range(3, 200))
        received = 0
        async with grpc.aio.insecure_channel(cluster.router_address) as channel:
            call = inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=60)
            async for msg in call:
                received += len(msg.token_ids)
                if received >= 5:
                    call.cancel()
                    break
        return received

    assert asyncio.run(cancel_after_tokens()) >= 5
    assert_pools_drain(cluster)
