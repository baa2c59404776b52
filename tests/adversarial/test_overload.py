"""Load shedding (issue 12, item 8): beyond a router's admission limits, requests are refused at once with HTTP 429
and Retry-After (gRPC RESOURCE_EXHAUSTED) instead of queueing for minutes; the admitted ones finish correctly."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from ops.launcher import ClusterSpec, LocalCluster
from splitserve.v1 import inference_pb2 as pb
from splitserve.v1 import inference_pb2_grpc
from tests.integration.test_cluster_disaggregated import assert_pools_drain

pytestmark = pytest.mark.timeout(300)
MAX_RUNNING, MAX_QUEUED = 8, 16
PROMPT = list(range(5, 40))
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def cluster(llama_dir: Path) -> Iterator[LocalCluster]:
    spec = ClusterSpec(
        model_dir=llama_dir,
        prefill=1,
        decode=1,
        grpc_port=0,
        http_port=0,
        router_args=["--max-concurrent-requests", str(MAX_RUNNING), "--max-queued-requests", str(MAX_QUEUED)],
    )
    with LocalCluster(spec) as running:
        yield running


def test_300_concurrent_http_requests_excess_get_429_quickly_rest_finish(
    cluster: LocalCluster, llama_dir: Path
) -> None:
    url = f"http://{cluster.http_address}/v1/completions"
    body = {
        "model": llama_dir.name, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
    }  # fmt: skip

    async def main() -> tuple[str, list[tuple[int, dict[str, Any], str | None, float]]]:
        connector = aiohttp.TCPConnector(limit=0)  # all 300 at once, not 100 at a time
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=240)
        ) as session:
            async with session.post(url, json=body) as response:
                reference = (await response.json())["choices"][0]["text"]

            async def one() -> tuple[int, dict[str, Any], str | None, float]:
                started = time.monotonic()
                async with session.post(url, json=body) as response:
                    answer = await response.json()
                    return (
                        response.status,
                        answer,
                        response.headers.get("Retry-After"),
                        time.monotonic() - started,
                    )

            return reference, await asyncio.gather(*(one() for _ in range(300)))

    reference, results = asyncio.run(main())
    refused = [r for r in results if r[0] == 429]
    served = [r for r in results if r[0] == 200]
    assert len(refused) + len(served) == 300, sorted({r[0] for r in results})
    # At most running + queued are held at a time; with 300 arriving together most are refused.
    assert len(served) >= MAX_RUNNING + MAX_QUEUED and len(refused) >= 300 - 3 * (MAX_RUNNING + MAX_QUEUED)
    for _, answer, retry_after, _ in refused:
        assert retry_after is not None and int(retry_after) >= 1
        assert answer["error"]["type"] == "rate_limit_error"
    # Refused at once, not after a wait for a slot: faster than the requests that were served (their wait and
    # generation), and far below the minutes a backlog of 300 took before load shedding.
    latencies = [seconds for *_, seconds in refused]
    served_latencies = [seconds for *_, seconds in served]
    assert statistics.median(latencies) < statistics.median(served_latencies), (latencies, served_latencies)
    assert max(latencies) < 5.0, latencies
    for _, answer, _, _ in served:
        [choice] = answer["choices"]
        assert choice["text"] == reference and choice["finish_reason"] == "length"
    assert_pools_drain(cluster, expected_nodes=2)


def test_grpc_excess_gets_resource_exhausted(cluster: LocalCluster) -> None:
    request = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=PROMPT),
        sampling=pb.SamplingParameters(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True),
    )

    async def main() -> list[tuple[grpc.StatusCode, str]]:
        async with grpc.aio.insecure_channel(cluster.router_address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)

            async def one() -> tuple[grpc.StatusCode, str]:
                try:
                    tokens = [t async for msg in stub.Generate(request, timeout=120) for t in msg.token_ids]
                except grpc.aio.AioRpcError as exc:
                    return exc.code(), exc.details() or ""
                return grpc.StatusCode.OK, str(len(tokens))

            return await asyncio.gather(*(one() for _ in range(150)))

    results = asyncio.run(main())
    codes = {code for code, _ in results}
    assert codes == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, results[:5]
    assert all(detail == str(MAX_TOKENS) for code, detail in results if code == grpc.StatusCode.OK)
    assert any("overloaded" in detail for code, detail in results if code != grpc.StatusCode.OK)
    assert_pools_drain(cluster, expected_nodes=2)
