"""Rank-to-rank KV (cluster/node/rank_kv.py) and the calls it makes into worker ranks (rank_calls.py).

Real pieces on 127.0.0.1: torch-backend transports over per-rank pools, and rank 0's calls crossing a real
multiprocessing pipe to a thread that plays the worker rank's call loop (the worker's process is what the cluster
tests add). Two "nodes" of two ranks each: rank i of one writes rank i of the other.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

from cluster.node.rank_kv import RankedKV, RankKV, RankWrite, TensorParallelTransport
from engine.tensor_parallel.rank_calls import RankCallFailed, RankChannel, serve_calls
from kvtransfer import create_transport
from kvtransfer.base import TransferState
from kvtransfer.descriptor import NodeDescriptor
from kvtransfer.notifications import kv_done

LAYERS, BLOCKS, BLOCK, HEADS_PER_RANK, DIM = 2, 8, 4, 1, 8
HEADS = [(0, 1), (1, 2)]


@dataclass
class Node:
    node_id: str
    pools: list[list[torch.Tensor]]  # per rank
    ranks: RankedKV


def pool(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (BLOCKS, 2, BLOCK, HEADS_PER_RANK, DIM)
    return [torch.randn(shape, generator=generator) for _ in range(LAYERS)]


def make_node(node_id: str, seed: int, closing: list[object]) -> Node:
    pools = [pool(seed), pool(seed + 1)]
    options = {"host": "127.0.0.1", "transfer_timeout_s": 5.0}
    local = RankKV(0, pools[0], "torch", node_id, options)
    worker = RankKV(1, pools[1], "torch", node_id, options)
    rank0_end, worker_end = mp.Pipe()
    serve_calls(worker_end, worker, 1)
    channel = RankChannel(1, rank0_end)
    ranks = RankedKV(local, [channel], HEADS)
    closing.append(ranks)
    return Node(node_id, pools, ranks)


@pytest.fixture
def closing() -> Iterator[list[object]]:
    made: list[object] = []
    yield made
    for ranks in made:
        ranks.close()  # type: ignore[attr-defined]


def published(node: Node) -> NodeDescriptor:
    """What the node publishes: its whole-heads transport's descriptor with its ranks'."""
    whole = create_transport("torch", node.node_id, host="127.0.0.1")
    try:
        whole.register(pool(99))
        return NodeDescriptor.from_bytes(TensorParallelTransport(whole, node.ranks).local_descriptor())
    finally:
        whole.close()


def settle(ranks: RankedKV, rid: str) -> tuple[TransferState, str | None, int]:
    deadline = time.monotonic() + 10
    while (state := ranks.state(rid))[0] is TransferState.PENDING and time.monotonic() < deadline:
        time.sleep(0.01)
    return state


def complete_notifications(ranks: RankedKV, want: int) -> list[tuple[str, bytes]]:
    got: list[tuple[str, bytes]] = []
    deadline = time.monotonic() + 10
    while len(got) < want and time.monotonic() < deadline:
        got += ranks.notifications()
        time.sleep(0.01)
    return got


def test_each_rank_writes_its_peer_rank_and_kv_done_counts_once_both_ranks_have_it(
    closing: list[object],
) -> None:
    prefill, decode = make_node("p", 1, closing), make_node("d", 10, closing)
    peer = published(decode)
    assert prefill.ranks.serves(peer)
    key = prefill.ranks.connect(peer)
    assert key == "d"

    # A layer plan, as a step would run it on each rank, then the rest in one piece, then kv-done.
    plan = [RankWrite(key, "r1", [1, 2], [5, 6])]
    prefill.ranks.local.on_layer_stored(0, plan)
    prefill.ranks.channels[0].call("on_layer_stored", 0, plan)
    prefill.ranks.write(key, "r1", [1], [1, 2], [5, 6])
    assert settle(prefill.ranks, "r1")[0] is TransferState.DONE
    assert decode.ranks.notifications() == []  # no notification yet
    prefill.ranks.local.write(key, "r1", [1], [2], [6], kv_done("r1"))  # rank 0's kv-done alone
    time.sleep(0.5)
    assert decode.ranks.notifications() == []  # one rank's kv-done completes nothing
    prefill.ranks.channels[0].call("write", key, "r1", [1], [2], [6], kv_done("r1"))
    assert complete_notifications(decode.ranks, 1) == [("p", kv_done("r1"))]
    state, error, sent = settle(prefill.ranks, "r1")
    assert (state, error) == (TransferState.DONE, None)
    block_bytes = 2 * BLOCK * HEADS_PER_RANK * DIM * 4
    assert sent == 2 * (2 * 2 + 1) * block_bytes  # two ranks: 2 layers x 2 blocks, plus the kv-done's block
    for rank in range(2):
        for layer in range(LAYERS):
            assert torch.equal(decode.pools[rank][layer][5:7], prefill.pools[rank][layer][1:3])


def test_a_partial_arrival_is_forgotten_by_a_new_reservation_of_the_request(closing: list[object]) -> None:
    prefill, decode = make_node("p", 1, closing), make_node("d", 10, closing)
    peer = published(decode)
    key = prefill.ranks.connect(peer)
    prefill.ranks.local.write(key, "r2", [1], [0], [0], kv_done("r2"))  # attempt 1: only rank 0's arrived
    assert settle(prefill.ranks, "r2")[0] is TransferState.DONE
    time.sleep(0.5)
    assert decode.ranks.notifications() == []
    decode.ranks.discard_arrivals("r2")  # the decode node reserves r2 anew
    prefill.ranks.channels[0].call("write", key, "r2", [1], [0], [0], kv_done("r2"))  # attempt 2, rank 1
    time.sleep(0.5)
    assert decode.ranks.notifications() == []  # rank 0's old kv-done does not complete attempt 2


def test_writes_to_an_unconnected_peer_or_a_gone_rank_show_as_failed(closing: list[object]) -> None:
    node = make_node("p", 1, closing)
    node.ranks.write("nobody", "r3", [0], [0], [0])
    state, error, _ = node.ranks.state("r3")
    assert state is TransferState.FAILED and "not connected" in (error or "")
    node.ranks.forget("r3")
    assert node.ranks.state("r3")[0] is TransferState.DONE  # nothing left of it
    node.ranks.channels[0].close()  # rank 1 gone
    state, error, _ = node.ranks.state("r4")
    assert state is TransferState.FAILED and "rank 1" in (error or "")


def test_peers_of_another_degree_or_head_split_are_not_served_rank_to_rank(closing: list[object]) -> None:
    node, other = make_node("p", 1, closing), make_node("q", 5, closing)
    described = published(other)
    assert node.ranks.serves(described)
    assert not node.ranks.serves(dataclasses.replace(described, tp_ranks=()))  # a TP 1 node
    assert not node.ranks.serves(dataclasses.replace(described, tp_ranks=described.tp_ranks[::-1]))
    assert not node.ranks.serves(dataclasses.replace(described, tp_ranks=described.tp_ranks[:1]))


class Worker:
    def echo(self, value: object) -> object:
        return value

    def boom(self) -> None:
        raise ValueError("bad block")

    def slow(self) -> None:
        time.sleep(2)


def test_a_rank_call_carries_errors_and_a_late_reply_breaks_the_channel() -> None:
    rank0_end, worker_end = mp.Pipe()
    serve_calls(worker_end, Worker(), 1)
    channel = RankChannel(1, rank0_end)
    try:
        assert channel.call("echo", [1, "x"]) == [1, "x"]
        with pytest.raises(RankCallFailed, match="boom failed: ValueError: bad block"):
            channel.call("boom")
        assert channel.call("echo", 2) == 2  # a raising method leaves the channel usable
        with pytest.raises(RankCallFailed, match="no reply to slow"):
            channel.call("slow", timeout_s=0.2)
        with pytest.raises(
            RankCallFailed, match="no reply to slow"
        ):  # broken for good: replies would mismatch
            channel.call("echo", 3)
    finally:
        channel.close()
        worker_end.close()
