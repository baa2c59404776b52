"""A prefill node pulling prefix blocks from the decode node (prefill_node/prefix_pull.py), when that goes wrong.

The working path (turn 2 of a conversation computes only its new message) is in test_kv_routing.py. Here the
router is left out and this test plays it, calling the nodes' internal RPCs itself, so that it can hand the prefill
node a decode address where nothing answers: the pull fails, the prefill node computes those blocks instead, and
the request still ends with exactly a single engine's tokens. And the decode node lends nothing it should not: no
blocks of a reservation it does not hold, none past the ones its prefix cache filled.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cluster.auth import TOKEN_METADATA_KEY
from cluster.state import ClusterView
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams
from ops.launcher import ClusterSpec, LocalCluster
from splitserve.v1 import cluster_pb2 as cpb
from splitserve.v1 import cluster_pb2_grpc
from splitserve.v1 import inference_pb2 as pb
from tests.integration.cluster_client import generate_many

pytestmark = pytest.mark.timeout(300)
BLOCK = 16
MAX_TOKENS = 24
SAMPLING = {"max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True}


def closed_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="module")
def cluster(llama_dir: Path) -> Iterator[LocalCluster]:
    spec = ClusterSpec(model_dir=llama_dir, prefill=1, decode=1, grpc_port=0, http_port=0)
    with LocalCluster(spec) as running:
        yield running


def conversation(llama_dir: Path, seed: int) -> tuple[list[int], list[int], list[int]]:
    """Turn 1's prompt and a turn 2 extending it with turn 1's answer, and turn 2's single-engine tokens."""
    rng = random.Random(seed)
    turn1 = [rng.randrange(3, 1000) for _ in range(50)]
    engine = LLMEngine(llama_dir, EngineConfig(num_kv_blocks=256))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    out1 = engine.generate([turn1], params)[0].token_ids
    turn2 = turn1 + out1 + [rng.randrange(3, 1000) for _ in range(20)]
    return turn1, turn2, engine.generate([turn2], params)[0].token_ids


def test_a_pull_from_an_unreachable_decode_node_costs_a_recompute_not_the_request(
    cluster: LocalCluster, llama_dir: Path
) -> None:
    turn1, turn2, expected = conversation(llama_dir, seed=21)
    generate_many(cluster.router_address, [turn1], **SAMPLING)  # decoded on the one decode node, cached there
    prefill, decode = cluster.by_role("prefill")[0], cluster.by_role("decode")[0]
    token = [(TOKEN_METADATA_KEY, cluster.cluster_token)]
    sampling = pb.SamplingParameters(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    with (
        grpc.insecure_channel(prefill.address) as p_channel,
        grpc.insecure_channel(decode.address) as d_channel,
    ):
        decode_stub = cluster_pb2_grpc.DecodeNodeStub(d_channel)
        rid, reply = wait_for_cached_reservation(decode_stub, token, turn2, sampling)
        held = (len(turn1) + MAX_TOKENS - 1) // BLOCK  # turn 1's prompt and answer, decoded there
        assert reply.cached_blocks == held
        first = cluster_pb2_grpc.PrefillNodeStub(p_channel).Prefill(
            cpb.PrefillRequest(
                request_id=rid, prompt_token_ids=turn2, sampling=sampling, decode_node_id=decode.node_id,
                decode_transport_descriptor=transport_of(cluster, decode.node_id),
                decode_block_ids=reply.block_ids, decode_cached_blocks=reply.cached_blocks,
                deadline_seconds=60, decode_address=closed_address(),
            ),
            timeout=90, metadata=token,
        )  # fmt: skip
        assert first.imported_blocks == 0 and first.imported_bytes == 0
        assert (
            first.cached_prompt_tokens == len(turn1) // BLOCK * BLOCK
        )  # its own cache: turn 1's prompt only
        stream = decode_stub.Decode(
            cpb.DecodeRequest(request_id=rid, first_token=first.first_token, kv_wait_seconds=30),
            timeout=90, metadata=token,
        )  # fmt: skip
        tokens = [first.first_token.token_id] + [t for msg in stream for t in msg.token_ids]
    assert tokens == expected


def test_the_decode_node_lends_only_cached_blocks_of_a_reservation_it_holds(
    cluster: LocalCluster, llama_dir: Path
) -> None:
    turn1, turn2, _ = conversation(llama_dir, seed=22)
    generate_many(cluster.router_address, [turn1], **SAMPLING)
    prefill, decode = cluster.by_role("prefill")[0], cluster.by_role("decode")[0]
    token = [(TOKEN_METADATA_KEY, cluster.cluster_token)]
    sampling = pb.SamplingParameters(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    with grpc.insecure_channel(decode.address) as channel:
        stub = cluster_pb2_grpc.DecodeNodeStub(channel)
        rid, reply = wait_for_cached_reservation(stub, token, turn2, sampling)
        descriptor = transport_of(cluster, prefill.node_id)

        def ask(rid: str, first: int, count: int, metadata=token) -> grpc.RpcError:  # type: ignore[no-untyped-def]
            with pytest.raises(grpc.RpcError) as refused:
                stub.SendPrefix(
                    cpb.SendPrefixRequest(
                        request_id=rid, prefill_transport_descriptor=descriptor, first_block=first,
                        prefill_block_ids=list(range(count)), deadline_seconds=5,
                    ),
                    timeout=30, metadata=metadata,
                )  # fmt: skip
            return refused.value

        assert ask("nobody", 0, 1).code() == grpc.StatusCode.NOT_FOUND
        beyond = ask(rid, reply.cached_blocks - 1, 2)  # its last block's KV has not been written
        assert beyond.code() == grpc.StatusCode.INVALID_ARGUMENT and "hold cached KV" in beyond.details()
        assert ask(rid, 0, 1, metadata=[]).code() == grpc.StatusCode.UNAUTHENTICATED
        stub.Abort(cpb.AbortRequest(request_id=rid, no_kv_writes=True), timeout=10, metadata=token)


def wait_for_cached_reservation(stub, token, prompt, sampling):  # type: ignore[no-untyped-def]
    """(request id, reply) of a reservation of prompt on the decode node once its cache holds turn 1 (the node
    caches it as turn 1 ends); a reservation made too early is given back."""
    for attempt in range(50):
        rid = f"turn2-{attempt}"
        reply = stub.Reserve(
            cpb.ReserveRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling, hold_seconds=60),
            timeout=10, metadata=token,
        )  # fmt: skip
        if reply.cached_blocks:
            return rid, reply
        stub.Abort(cpb.AbortRequest(request_id=rid, no_kv_writes=True), timeout=10, metadata=token)
        time.sleep(0.1)
    raise AssertionError("the decode node never cached turn 1")


def transport_of(cluster: LocalCluster, node_id: str) -> bytes:
    """A node's KV transport descriptor, as it registered it in the cluster state."""
    with ClusterView(cluster.redis_url) as view:
        state = view.get(node_id)
        assert state is not None
        return state.info.transport
