"""Poison requests cannot stop a node (issue 12, item 1), on a real split cluster (1 prefill + 1 decode).

- Each value that used to kill an engine thread (a seed past 1.84e13, temperature 1e-40, repetition_penalty 1e-45 or
  inf, 10,000 stop strings, a 1 MB stop string, 100k stop token ids, a 1 MB request id) is now either served
  correctly (any uint64 seed) or refused with INVALID_ARGUMENT / HTTP 400 naming the field, over gRPC and HTTP.
- A request forced to fail inside the prefill engine (the engine's test hook, SPLITSERVE_TEST_FAIL_MARKER) fails
  alone with ABORTED, which the router does not retry elsewhere, while 8 concurrent requests finish exactly.
- An engine that fails every forward stops its node: exit code 1, out of the registry.
Afterwards every node is still running and registered, and a normal request gets the single-process engine's
exact greedy output.
"""

from __future__ import annotations

import asyncio
import json
import random
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cluster.auth import TOKEN_METADATA_KEY
from cluster.state import ClusterView
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.fault_injection import ENV_VAR
from engine.fault_isolation import MAX_FAILED_FORWARDS_IN_A_ROW
from engine.sampling_params import SamplingParams
from ops.launcher import ClusterSpec, LocalCluster
from splitserve.v1 import inference_pb2 as pb
from splitserve.v1 import inference_pb2_grpc
from tests.integration.cluster_client import generate

pytestmark = pytest.mark.timeout(300)
MARKER = 1023  # the tiny model's last token id; every other prompt here draws from 3..999
MAX_TOKENS = 10
CALL_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def cluster(llama_dir: Path) -> Iterator[LocalCluster]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv(ENV_VAR, str(MARKER))  # the nodes inherit it; no client can set it
        spec = ClusterSpec(model_dir=llama_dir, prefill=1, decode=1, grpc_port=0, http_port=0)
        with LocalCluster(spec) as running:
            yield running


def ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 1000) for _ in range(n)]


def reference(model: Path, prompts: list[list[int]], **sampling: object) -> list[list[int]]:
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, **sampling)  # type: ignore[arg-type]
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=256))
    return [c.token_ids for c in engine.generate(prompts, params)]


async def grpc_call(
    address: str, request: pb.GenerateRequest, metadata: tuple[tuple[str, str], ...] = ()
) -> list[int]:
    async with grpc.aio.insecure_channel(
        address, options=[("grpc.max_send_message_length", 16 * 1024 * 1024)]
    ) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        call = stub.Generate(request, timeout=CALL_TIMEOUT_S, metadata=metadata)
        return [t async for msg in call for t in msg.token_ids]


def grpc_status(
    address: str,
    prompt: list[int],
    request_id: str = "",
    metadata: tuple[tuple[str, str], ...] = (),
    **sampling: object,
) -> tuple[grpc.StatusCode, str]:
    request = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=prompt),
        request_id=request_id,
        sampling=pb.SamplingParameters(max_tokens=MAX_TOKENS, ignore_eos=True, **sampling),  # type: ignore[arg-type]
    )
    try:
        asyncio.run(grpc_call(address, request, metadata))
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def http_completion(cluster: LocalCluster, model: str, body: dict[str, object]) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://{cluster.http_address}/v1/completions",
        data=json.dumps({"model": model, "max_tokens": MAX_TOKENS, "ignore_eos": True, **body}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=CALL_TIMEOUT_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def assert_cluster_whole(cluster: LocalCluster, model: Path) -> None:
    """Every node still runs and is registered, and a normal request gets the exact greedy output."""
    prompt = ids(20, seed=99)
    result = asyncio.run(
        generate(cluster.router_address, prompt, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    )
    assert result.token_ids == reference(model, [prompt], temperature=0.0)[0]
    with ClusterView(cluster.redis_url) as view:
        for proc in cluster.processes:
            assert proc.popen.poll() is None, f"{proc.role} exited with {proc.popen.returncode}"
            if proc.role != "router":
                assert view.wait_for(lambda p=proc: view.get(p.node_id) is not None, timeout_s=5.0)


@pytest.mark.parametrize(
    ("sampling", "field"),
    [
        ({"temperature": 1e-40}, "temperature"),
        ({"repetition_penalty": 1e-45}, "repetition_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"stop": ["x"] * 10_000}, "stop"),
        ({"stop": ["x" * 1_000_000]}, "stop"),
        ({"stop_token_ids": list(range(100_000))}, "stop_token_ids"),
    ],
    ids=["temperature-1e-40", "repetition-1e-45", "repetition-inf", "10k-stops", "1mb-stop", "100k-stop-ids"],
)
def test_poison_sampling_is_refused_over_grpc(
    cluster: LocalCluster, sampling: dict[str, object], field: str
) -> None:
    code, details = grpc_status(cluster.router_address, ids(8, seed=1), **{"temperature": 1.0, **sampling})
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert field in details


def test_a_1mb_request_id_is_refused_over_grpc(cluster: LocalCluster) -> None:
    code, details = grpc_status(cluster.router_address, ids(8, seed=2), request_id="r" * 1_000_000)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "request_id" in details


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"temperature": 1e-40}, "temperature"),
        ({"repetition_penalty": 1e-45}, "repetition_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),  # json.dumps writes Infinity
        ({"stop": ["x"] * 10_000}, "stop"),
        ({"stop": ["x" * 1_000_000]}, "stop"),
        ({"seed": 2**64}, "seed"),
    ],
    ids=["temperature-1e-40", "repetition-1e-45", "repetition-inf", "10k-stops", "1mb-stop", "seed-2**64"],
)
def test_poison_sampling_is_refused_over_http(
    cluster: LocalCluster, llama_dir: Path, body: dict[str, object], field: str
) -> None:
    status, answer = http_completion(cluster, llama_dir.name, {"prompt": ids(8, seed=3), **body})
    assert status == 400, answer
    assert field in answer["error"]["message"]


@pytest.mark.parametrize("seed", [18_400_000_000_000, 2**63, 2**64 - 1])
def test_huge_seeds_are_served_like_the_engine_serves_them(
    cluster: LocalCluster, llama_dir: Path, seed: int
) -> None:
    prompt = ids(12, seed=4)
    [expected] = reference(llama_dir, [prompt], temperature=1.0, seed=seed)
    request = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=prompt),
        sampling=pb.SamplingParameters(max_tokens=MAX_TOKENS, ignore_eos=True, temperature=1.0, seed=seed),
    )
    assert asyncio.run(grpc_call(cluster.router_address, request)) == expected
    status, answer = http_completion(
        cluster, llama_dir.name, {"prompt": prompt, "temperature": 1.0, "seed": seed}
    )
    assert status == 200, answer
    assert answer["usage"]["completion_tokens"] == MAX_TOKENS


def test_a_request_failing_inside_the_engine_fails_alone(cluster: LocalCluster, llama_dir: Path) -> None:
    batch = [ids(30 + i, seed=10 + i) for i in range(8)]
    expected = reference(llama_dir, batch, temperature=0.0)

    async def main() -> tuple[BaseException | list[int], list[list[int]]]:
        async def one(prompt: list[int]) -> list[int]:
            result = await generate(
                cluster.router_address, prompt, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True
            )
            return result.token_ids

        poison = asyncio.create_task(one([*ids(20, seed=5), MARKER, *ids(5, seed=6)]))
        others = await asyncio.gather(*(one(p) for p in batch))
        return (await asyncio.gather(poison, return_exceptions=True))[0], others

    poisoned, others = asyncio.run(main())
    assert others == expected
    assert isinstance(poisoned, grpc.aio.AioRpcError)
    # ABORTED is not retried on other nodes: a request that breaks its computation would break theirs too.
    assert poisoned.code() == grpc.StatusCode.ABORTED, poisoned.details()
    assert "injected fault" in (poisoned.details() or "")
    assert_cluster_whole(cluster, llama_dir)


def test_the_cluster_is_whole_after_the_poison(cluster: LocalCluster, llama_dir: Path) -> None:
    assert_cluster_whole(cluster, llama_dir)


def test_a_node_whose_engine_cannot_compute_exits_1_and_leaves(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_VAR, "*")  # every forward fails, as on a broken device
    spec = ClusterSpec(
        model_dir=llama_dir, prefill=0, decode=0, colocated=1, routers=0, grpc_port=0, http_port=0
    )
    with LocalCluster(spec) as cluster, ClusterView(cluster.redis_url) as view:
        node = cluster.by_role("colocated")[0]
        assert view.wait_for(lambda: view.get(node.node_id) is not None, timeout_s=5.0)
        for i in range(
            MAX_FAILED_FORWARDS_IN_A_ROW
        ):  # each fails; the last one convinces the engine to give up
            token = ((TOKEN_METADATA_KEY, cluster.cluster_token),)  # a node port: only cluster members get in
            code, details = grpc_status(node.address, ids(6, seed=20 + i), metadata=token)
            assert code not in (grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED), details
        assert node.popen.wait(30) == 1
        assert view.wait_for(lambda: view.get(node.node_id) is None, timeout_s=5.0)
        stopped = [e for p, e in cluster.poll_events() if p is node and e.get("event") == "stopped"]
        assert stopped and "forwards in a row failed" in str(stopped[0].get("error"))
