"""KV-aware routing on a live cluster: turn 2 of a conversation goes where turn 1's KV is cached.

2 prefill + 2 decode nodes, `--policy kv`. Each node publishes the prefix-cache keys it holds (KV events through
Redis); the router hashes each prompt the same way and sends it to the prefill node that computes the least. Turn 2
of a conversation (turn 1's prompt and output plus a new message) must land on the prefill node that computed turn
1 and on the decode node that decoded it, which holds turn 1's prompt and output. The decode node shares those
blocks and the prefill node sends only the rest (the request log's transfer bytes count them); the prefill node,
which holds turn 1's prompt, gets the answer's blocks from the decode node (prefill_node/prefix_pull.py) and
computes only the new message: the usage's cached_prompt_tokens counts every block the decode node held. After
the caches were forced to evict turn 1 (unrelated traffic through small KV pools), the same requests still return
exactly the single engine's tokens: a stale index costs a recompute, never a wrong token.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import redis

from cluster.state.kv_events import encode_key, kv_set_key
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.prefix_hash import chain
from engine.sampling_params import SamplingParams
from ops.launcher import ClusterSpec, LocalCluster
from tests.integration.cluster_client import generate_many, recent_requests

pytestmark = pytest.mark.timeout(300)
MAX_TOKENS = 24
BLOCK = 16  # the nodes' default block size
SAMPLING = {"max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True}


LAYERS = 2  # the tiny model's


def blocks(prompt: list[int]) -> int:
    return -(-len(prompt) // BLOCK)


def single_engine_tokens(model: Path, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=1024))
    return [c.token_ids for c in engine.generate(prompts, params)]


def two_turns(
    model: Path, rng: random.Random, conversations: int
) -> tuple[list[list[int]], list[list[int]], list[list[int]], list[list[int]]]:
    """Turn 1's prompts and a single engine's answers, then turn 2's (turn 1, its answer, a new message) and theirs."""
    turn1 = [[rng.randrange(3, 1000) for _ in range(rng.randrange(40, 90))] for _ in range(conversations)]
    out1 = single_engine_tokens(model, turn1)
    turn2 = [p + o + [rng.randrange(3, 1000) for _ in range(20)] for p, o in zip(turn1, out1, strict=True)]
    return turn1, out1, turn2, single_engine_tokens(model, turn2)


def holders(client: redis.Redis, prefill_ids: list[str], key: int) -> list[str]:
    return [node for node in prefill_ids if client.sismember(kv_set_key(node), encode_key(key))]


def wait_until(predicate, timeout_s: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_turn_two_reuses_turn_ones_prefix_and_eviction_costs_only_a_recompute(llama_dir: Path) -> None:
    rng = random.Random(11)
    turn1, out1, turn2, out2 = two_turns(llama_dir, rng, 4)

    # 1 MiB of KV per node: 128 blocks of this model, so unrelated traffic evicts turn 1 quickly.
    spec = ClusterSpec(model_dir=llama_dir, prefill=2, decode=2, grpc_port=0, http_port=0,
                       node_args=["--kv-cache-mb", "1"], router_args=["--policy", "kv"])  # fmt: skip
    with LocalCluster(spec) as cluster:
        client = redis.Redis.from_url(cluster.redis_url)
        prefill_ids = [p.node_id for p in cluster.by_role("prefill")]
        first = generate_many(cluster.router_address, turn1, **SAMPLING)
        assert [r.token_ids for r in first] == out1
        last_keys = [list(chain(p, BLOCK))[-1] for p in turn1]
        # Each turn-1 prompt's blocks are published by the one prefill node that computed it.
        assert wait_until(lambda: all(holders(client, prefill_ids, k) for k in last_keys), 10.0)
        time.sleep(0.3)  # the router hears the same announcement; give its subscriber a moment

        # One turn at a time, as conversations' turns come: with all four at once, a node holding two of them
        # rightly sends the second elsewhere when its queue outweighs the hit (router/kv_policy.py).
        second = [generate_many(cluster.router_address, [prompt], **SAMPLING)[0] for prompt in turn2]
        assert [r.token_ids for r in second] == out2
        # The decode node computed turn 1's prompt and all but the last output token: those full blocks stay there.
        held = [(len(p) + MAX_TOKENS - 1) // BLOCK for p in turn1]
        reused = [r.usage.cached_prompt_tokens if r.usage else -1 for r in second]
        assert reused == [h * BLOCK for h in held]  # computed: only what follows turn 1's last full block

        # The 8 requests so far, by prompt length (distinct here; turn 1's ran concurrently, in any order).
        by_length = {r["prompt_tokens"]: r for r in recent_requests(cluster, 8)}
        assert sorted(by_length) == sorted(len(p) for p in turn1 + turn2)
        first_records = [by_length[len(p)] for p in turn1]
        second_records = [by_length[len(p)] for p in turn2]
        # One transfer writes each block once per layer, plus one block of the last layer again (kv-done rides on
        # it): turn 1 gives the bytes of one block of one layer.
        layer_block = first_records[0]["transfer_bytes"] // (blocks(turn1[0]) * LAYERS + 1)
        assert [r["transfer_bytes"] for r in first_records] == [
            (blocks(p) * LAYERS + 1) * layer_block for p in turn1
        ]
        for t1, t2, p1, p2, h in zip(first_records, second_records, turn1, turn2, held, strict=True):
            assert t2["nodes"] == t1["nodes"]  # both turns on the same prefill and decode nodes
            assert (
                t2["transfer_bytes"] == ((blocks(p2) - h) * LAYERS + 1) * layer_block
            )  # only what it lacked
            # Back the other way: the answer's blocks the prefill node lacked, every layer of each once.
            assert t2["imported_bytes"] == (h - len(p1) // BLOCK) * LAYERS * layer_block

        # Unrelated prompts until no node holds any turn-1 block any more (bounded rounds).
        first_keys = [next(chain(p, BLOCK)) for p in turn1]
        node_ids = prefill_ids + [d.node_id for d in cluster.by_role("decode")]
        rounds = 0
        while any(holders(client, node_ids, k) for k in first_keys):
            rounds += 1
            assert rounds <= 30, "turn 1's blocks were never evicted"
            # Decoded to their end (max_tokens 2), so that no reservation outlives its round in the small pools.
            noise = [[rng.randrange(3, 1000) for _ in range(250)] for _ in range(3)]
            generate_many(cluster.router_address, noise, max_tokens=2, temperature=0.0, ignore_eos=True)
        assert rounds > 0
        again = generate_many(cluster.router_address, turn2, **SAMPLING)
        assert [r.token_ids for r in again] == out2
        # The router may still believe the old index for a moment; the engine found nothing and recomputed.
        assert [r.usage.cached_prompt_tokens if r.usage else -1 for r in again] == [0] * len(turn2)


def test_without_prefix_caching_every_block_is_recomputed_and_resent(llama_dir: Path) -> None:
    """`--no-prefix-caching`, Splitwise's behaviour and the baseline of benchmarks/kv_routing.py."""
    prompt = list(range(10, 90))  # 5 blocks
    spec = ClusterSpec(model_dir=llama_dir, prefill=1, decode=1, grpc_port=0, http_port=0,
                       node_args=["--no-prefix-caching"], router_args=["--policy", "kv"])  # fmt: skip
    with LocalCluster(spec) as cluster:
        results = [generate_many(cluster.router_address, [prompt], **SAMPLING)[0] for _ in range(2)]
        assert results[0].token_ids == results[1].token_ids
        assert [r.usage.cached_prompt_tokens if r.usage else -1 for r in results] == [0, 0]
        records = recent_requests(cluster, 2)
        assert records[0]["transfer_bytes"] == records[1]["transfer_bytes"] > 0
        client = redis.Redis.from_url(cluster.redis_url)
        for node in cluster.by_role("prefill") + cluster.by_role("decode"):
            assert client.scard(kv_set_key(node.node_id)) == 0  # nothing offered, nothing published


def test_local_prefill_runs_a_later_turn_on_the_decode_node_that_holds_it(llama_dir: Path) -> None:
    """`--policy-option local_prefill_tokens=64`: turn 2's new message is computed by the decode node holding turn 1's
    prompt and answer, with no prefill hop and no transfer; its tokens equal a single engine's."""
    rng = random.Random(3)
    turn1 = [rng.randrange(3, 1000) for _ in range(70)]
    out1 = single_engine_tokens(llama_dir, [turn1])[0]
    turn2 = turn1 + out1 + [rng.randrange(3, 1000) for _ in range(20)]
    out2 = single_engine_tokens(llama_dir, [turn2])[0]
    spec = ClusterSpec(model_dir=llama_dir, prefill=1, decode=1, grpc_port=0, http_port=0,
                       router_args=["--policy", "kv", "--policy-option", "local_prefill_tokens=64"])  # fmt: skip
    with LocalCluster(spec) as cluster:
        decode_id = cluster.by_role("decode")[0].node_id
        first = generate_many(cluster.router_address, [turn1], **SAMPLING)[0]
        assert first.token_ids == out1
        held = (len(turn1) + MAX_TOKENS - 1) // BLOCK  # the decode node's full blocks of turn 1
        client = redis.Redis.from_url(cluster.redis_url)
        last_key = list(chain(turn2, BLOCK, max_blocks=held))[-1]
        assert wait_until(lambda: client.sismember(kv_set_key(decode_id), encode_key(last_key)), 10.0)
        time.sleep(0.3)  # the router hears the same announcement
        second = generate_many(cluster.router_address, [turn2], **SAMPLING)[0]
        assert second.token_ids == out2
        assert second.usage is not None and second.usage.cached_prompt_tokens == held * BLOCK
        record = recent_requests(cluster, 1)[0]
        assert record["nodes"] == {"borrowed": decode_id} and record["transfer_bytes"] == 0
