"""Prompt logprobs and logit_bias over gRPC, through live clusters: split (1 prefill + 2 decode) and colocated.

The values must equal the single-process engine's (itself checked against Hugging Face in
tests/unit/test_prompt_logprobs.py) within 1e-4 in fp32, arrive on the stream's first message only, and not be sent
again when the router resumes a stream on another pair after its decode node died.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from cluster.state import ClusterView
from engine.config import EngineConfig
from engine.engine import Completion, LLMEngine
from engine.sampling_params import SamplingParams
from ops.launcher import ClusterSpec, LocalCluster
from splitserve.v1 import inference_pb2 as pb
from splitserve.v1 import inference_pb2_grpc
from tests.integration.cluster_client import status_of

pytestmark = pytest.mark.timeout(300)
TOLERANCE = 1e-4
TOP_K = 3
# Chunked prefill (64 tokens a step) and, in the split cluster, layer-wise KV streaming for prompts from 64 tokens.
NODE_ARGS = ["--kv-cache-mb", "16", "--max-batched-tokens", "64"]


@dataclass
class Messages:
    """Every message of one stream, as the client saw it."""

    token_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[list[pb.TokenLogprob]] = field(default_factory=list)  # one list per message

    @property
    def first_prompt_logprobs(self) -> list[pb.TokenLogprob]:
        return self.prompt_logprobs[0]


async def stream(address: str, prompt: list[int], progress: list[int] | None = None, **sampling) -> Messages:
    request = pb.GenerateRequest(sampling=pb.SamplingParameters(**sampling))
    request.token_ids.ids.extend(prompt)
    out = Messages()
    async with grpc.aio.insecure_channel(address) as channel:
        async for msg in inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=120):
            out.token_ids += msg.token_ids
            out.prompt_logprobs.append(list(msg.prompt_logprobs))
            if progress is not None:
                progress[0] += len(msg.token_ids)
    return out


def stream_many(address: str, prompts: list[list[int]], **sampling) -> list[Messages]:
    async def main() -> list[Messages]:
        return await asyncio.gather(*(stream(address, p, **sampling) for p in prompts))

    return asyncio.run(main())


def random_prompts(lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 1000) for _ in range(n)] for n in lengths]


PROMPTS = random_prompts([2, 17, 63, 150], seed=11)
SAMPLING = dict(max_tokens=5, temperature=0.0, ignore_eos=True, prompt_logprobs=TOP_K)


@pytest.fixture(scope="module")
def expected(llama_dir: Path) -> list[Completion]:
    engine = LLMEngine(llama_dir, EngineConfig(num_kv_blocks=256))
    return engine.generate(PROMPTS, SamplingParams(**SAMPLING))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def split(llama_dir: Path) -> Iterator[LocalCluster]:
    spec = ClusterSpec(
        model_dir=llama_dir, prefill=1, decode=2, grpc_port=0, http_port=0, node_args=NODE_ARGS,
        role_args={"prefill": ["--one-piece-below", "64"]},
    )  # fmt: skip
    with LocalCluster(spec) as running:
        yield running


@pytest.fixture(scope="module")
def colocated(llama_dir: Path) -> Iterator[LocalCluster]:
    spec = ClusterSpec(
        model_dir=llama_dir, prefill=0, decode=0, colocated=1, grpc_port=0, http_port=0, node_args=NODE_ARGS
    )
    with LocalCluster(spec) as running:
        yield running


def assert_same(got: list[pb.TokenLogprob], want: Completion) -> None:
    assert want.prompt_logprobs is not None
    assert [e.token_id for e in got] == want.prompt_token_ids[1:]
    for i, (a, b) in enumerate(zip(got, want.prompt_logprobs, strict=True)):
        assert abs(a.logprob - b.logprob) <= TOLERANCE, f"position {i}: {a.logprob} vs {b.logprob}"
        assert [t.token_id for t in a.top] == [t for t, _ in b.top], f"position {i}: alternatives differ"
        assert all(abs(t.logprob - v) <= TOLERANCE for t, (_, v) in zip(a.top, b.top, strict=True))


@pytest.mark.parametrize("mode", ["split", "colocated"])
def test_prompt_logprobs_equal_the_engine_and_come_first_only(
    mode: str, request: pytest.FixtureRequest, expected: list[Completion]
) -> None:
    cluster: LocalCluster = request.getfixturevalue(mode)
    # The same prompts once without prompt logprobs first: their blocks are then in the prefix cache, which a
    # request asking for prompt logprobs must not reuse (cached positions have no logits).
    stream_many(cluster.router_address, PROMPTS, max_tokens=1, temperature=0.0)
    results = stream_many(cluster.router_address, PROMPTS, **SAMPLING)
    for got, want in zip(results, expected, strict=True):
        assert got.token_ids == want.token_ids
        assert_same(got.first_prompt_logprobs, want)
        assert all(not later for later in got.prompt_logprobs[1:]), "prompt logprobs sent more than once"
        assert len(got.prompt_logprobs) > 1  # several messages: "first only" was tested


def test_no_prompt_logprobs_unless_asked(split: LocalCluster) -> None:
    [got] = stream_many(split.router_address, PROMPTS[2:3], max_tokens=3, temperature=0.0)
    assert all(not m for m in got.prompt_logprobs)


@pytest.mark.parametrize("mode", ["split", "colocated"])
def test_logit_bias_over_grpc(mode: str, request: pytest.FixtureRequest) -> None:
    cluster: LocalCluster = request.getfixturevalue(mode)
    biased = dict(max_tokens=6, temperature=1.0, seed=5, ignore_eos=True, logit_bias={42: 100.0})
    results = stream_many(cluster.router_address, PROMPTS, **biased)
    assert all(r.token_ids == [42] * 6 for r in results)
    code, details = status_of(cluster.router_address, [5, 6], logit_bias={500_000: 1.0})
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "logit_bias" in details, details
    code, details = status_of(cluster.router_address, [5, 6], logit_bias={7: 101.0})
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "logit_bias[7]" in details, details
    code, details = status_of(cluster.router_address, [5, 6], prompt_logprobs=21)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "prompt_logprobs" in details, details


def test_a_resumed_stream_does_not_send_prompt_logprobs_again(split: LocalCluster, llama_dir: Path) -> None:
    """Runs last in this module: it kills one of the split cluster's decode nodes."""
    prompts = random_prompts([40, 40, 40, 40], seed=12)
    sampling = dict(max_tokens=150, temperature=0.0, ignore_eos=True, prompt_logprobs=1)
    engine = LLMEngine(llama_dir, EngineConfig(num_kv_blocks=256))
    want = engine.generate(prompts, SamplingParams(**sampling))  # type: ignore[arg-type]
    victim = split.by_role("decode")[0]
    with ClusterView(split.redis_url) as view:

        async def main() -> tuple[list[Messages], bool]:
            progress = [[0] for _ in prompts]
            tasks = [
                asyncio.create_task(stream(split.router_address, p, progress[i], **sampling))
                for i, p in enumerate(prompts)
            ]
            deadline = time.monotonic() + 60
            while min(p[0] for p in progress) < 5 and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            state = view.get(victim.node_id)
            load = state.load if state else None
            held = load is not None and (
                load.running_requests > 0 or load.free_kv_blocks < load.total_kv_blocks
            )
            os.kill(victim.popen.pid, signal.SIGKILL)
            return list(await asyncio.gather(*tasks)), held

        results, held = asyncio.run(main())
    assert held, "the killed decode node served no stream: nothing was resumed"
    for got, completion in zip(results, want, strict=True):
        assert got.token_ids == completion.token_ids
        assert_same(got.first_prompt_logprobs, completion)
        assert all(not later for later in got.prompt_logprobs[1:]), "prompt logprobs sent again on resume"
