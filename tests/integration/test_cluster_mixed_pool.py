"""The mixed pool on a live cluster: when one pool is gone, a node of the other serves whole requests.

A router with `--policy mixed` treats an empty (or swamped) prompt pool as overloaded and lends a decode node to it,
and an empty (or full) token pool likewise borrows a prefill node, which then runs requests to their end instead of
handing the KV over (keep_local). Killing every node of one pool with SIGKILL is the plainest way to show that the
other pool really served the requests: there is no other node left. Tokens must equal the single-process engine's.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from pathlib import Path

import grpc
import pytest

from cluster.state import ClusterView
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams
from ops.launcher import ClusterSpec, LocalCluster
from tests.integration.cluster_client import generate, generate_many, status_of

pytestmark = pytest.mark.timeout(300)
MAX_TOKENS = 24


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 1000) for _ in range(rng.randrange(5, 120))] for _ in range(n)]


def expected_tokens(model: Path, batch: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return [c.token_ids for c in LLMEngine(model, EngineConfig(num_kv_blocks=1024)).generate(batch, params)]


@pytest.mark.parametrize("lost_pool", ["prefill", "decode"])
def test_the_other_pool_serves_whole_requests_when_one_pool_is_lost(llama_dir: Path, lost_pool: str) -> None:
    batch = prompts(4, seed=7)
    expected = expected_tokens(llama_dir, batch)
    spec = ClusterSpec(model_dir=llama_dir, prefill=1, decode=1, grpc_port=0, http_port=0,
                       router_args=["--policy", "mixed"])  # fmt: skip
    with LocalCluster(spec) as cluster, ClusterView(cluster.redis_url) as view:
        sampling = {"max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True}
        split = generate_many(cluster.router_address, batch, **sampling)
        assert [r.token_ids for r in split] == expected

        victim = cluster.by_role(lost_pool)[0]
        os.kill(victim.popen.pid, signal.SIGKILL)
        assert view.wait_for(lambda: view.get(victim.node_id) is None, timeout_s=5.0)
        # the router's own view drops the node on the same expiry event; give it the resync period to be sure
        survivor = cluster.by_role("decode" if lost_pool == "prefill" else "prefill")[0]
        assert view.get(survivor.node_id) is not None

        borrowed = generate_many(cluster.router_address, batch, **sampling)
        assert [r.token_ids for r in borrowed] == expected
        assert all(r.usage is not None and r.usage.completion_tokens == MAX_TOKENS for r in borrowed)


def test_without_the_mixed_pool_a_lost_pool_means_unavailable(llama_dir: Path) -> None:
    """The control for the test above: the default policy has no pair and no colocated node to fall back on."""
    spec = ClusterSpec(model_dir=llama_dir, prefill=1, decode=1, grpc_port=0, http_port=0)
    with LocalCluster(spec) as cluster, ClusterView(cluster.redis_url) as view:
        victim = cluster.by_role("prefill")[0]
        os.kill(victim.popen.pid, signal.SIGKILL)
        assert view.wait_for(lambda: view.get(victim.node_id) is None, timeout_s=5.0)
        code, _ = status_of(cluster.router_address, [5, 6, 7], max_tokens=4)
        assert code == grpc.StatusCode.UNAVAILABLE


def test_a_borrowed_prefill_node_streams_and_frees_its_blocks_on_cancel(llama_dir: Path) -> None:
    spec = ClusterSpec(model_dir=llama_dir, prefill=1, decode=1, grpc_port=0, http_port=0,
                       router_args=["--policy", "mixed"])  # fmt: skip
    with LocalCluster(spec) as cluster, ClusterView(cluster.redis_url) as view:
        decode, prefill = cluster.by_role("decode")[0], cluster.by_role("prefill")[0]
        os.kill(decode.popen.pid, signal.SIGKILL)
        assert view.wait_for(lambda: view.get(decode.node_id) is None, timeout_s=5.0)

        async def cancel_mid_stream() -> None:
            got = asyncio.Event()
            stream = generate(cluster.router_address, list(range(3, 40)), max_tokens=2000, temperature=0.0,
                              ignore_eos=True, on_tokens=lambda n: got.set())  # fmt: skip
            task = asyncio.create_task(stream)
            await asyncio.wait_for(got.wait(), 60)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(cancel_mid_stream())

        def idle() -> bool:
            state = view.get(prefill.node_id)
            load = state.load if state else None
            return (
                load is not None
                and load.running_requests == 0
                and load.free_kv_blocks == load.total_kv_blocks
            )

        assert view.wait_for(idle, timeout_s=10.0), "the cancelled request still holds the prefill node's KV"
