"""Rank-to-rank KV (cluster/node/rank_kv.py) and the calls it makes into worker ranks (rank_calls.py).

Real pieces on 127.0.0.1: torch-backend transports over per-rank pools, and rank 0's calls crossing a real
multiprocessing pipe to a thread that plays each worker rank's call loop (the worker's process is what the cluster
tests add). "Nodes" of 1 or 2 ranks over a model with 2 KV heads: rank r of a 2-way split holds head r.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

from cluster.node.rank_kv import (
    RankedKV,
    RankKV,
    RankWrite,
    Route,
    TensorParallelTransport,
    kv_routes,
    parse_rank_id,
    rank_node_id,
)
from engine.tensor_parallel.rank_calls import RankCallFailed, RankChannel, serve_calls
from kvtransfer import HeadSlice, create_transport
from kvtransfer.base import TransferState
from kvtransfer.descriptor import NodeDescriptor
from kvtransfer.notifications import kv_done

LAYERS, BLOCKS, BLOCK, KV_HEADS, DIM = 2, 8, 4, 2, 8


def heads_of(world: int) -> list[tuple[int, int]]:
    per = KV_HEADS // world
    return [(r * per, (r + 1) * per) for r in range(world)]


@dataclass
class Node:
    node_id: str
    pools: list[list[torch.Tensor]]  # per rank, [blocks, 2, block, its heads, D]
    ranks: RankedKV


def pool(heads: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn((BLOCKS, 2, BLOCK, heads, DIM), generator=generator) for _ in range(LAYERS)]


def make_node(node_id: str, world: int, seed: int, closing: list[object]) -> Node:
    """A node of `world` ranks: rank 0 in this thread, the others behind a real pipe, each with a transport."""
    pools, rank_kvs = [], []
    for rank, (first, stop) in enumerate(heads_of(world)):
        pools.append(pool(stop - first, seed + rank))
        transport_id = node_id if world == 1 else rank_node_id(node_id, rank, world)
        transport = create_transport("torch", transport_id, host="127.0.0.1", transfer_timeout_s=5.0)
        transport.register(pools[-1])
        rank_kvs.append(RankKV(rank, transport))
    channels = []
    for rank, worker in enumerate(rank_kvs[1:], start=1):
        rank0_end, worker_end = mp.Pipe()
        serve_calls(worker_end, worker, rank)
        channels.append(RankChannel(rank, rank0_end))
    ranks = RankedKV(rank_kvs[0], channels, heads_of)
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
    whole = create_transport("torch", f"{node.node_id}-whole", host="127.0.0.1")
    try:
        whole.register(pool(KV_HEADS, 99))
        return NodeDescriptor.from_bytes(TensorParallelTransport(whole, node.ranks).local_descriptor())
    finally:
        whole.close()


def settle(ranks: RankedKV, rid: str) -> tuple[TransferState, str | None, int]:
    deadline = time.monotonic() + 10
    while (state := ranks.state(rid))[0] is TransferState.PENDING and time.monotonic() < deadline:
        time.sleep(0.01)
    return state


def arrivals(ranks: RankedKV, want: int, wait_s: float = 10.0) -> list[tuple[str, bytes]]:
    got: list[tuple[str, bytes]] = []
    deadline = time.monotonic() + wait_s
    while len(got) < want and time.monotonic() < deadline:
        got += ranks.notifications()
        time.sleep(0.01)
    return got


def on_every_rank(node: Node, method: str, *args: object) -> None:
    """What each rank does by itself: rank 0 here, the others through their call pipe."""
    getattr(node.ranks.local, method)(*args)
    for channel in node.ranks.channels:
        channel.call(method, *args)


def test_routes_send_each_receiving_rank_its_heads_from_the_first_sender_holding_them() -> None:
    assert kv_routes([(0, 1), (1, 2)], [(0, 1), (1, 2)]) == [Route(0, 0, None), Route(1, 1, None)]
    assert kv_routes([(0, 1), (1, 2)], [(0, 2)]) == [
        Route(0, 0, HeadSlice(0, 0, 1)),
        Route(1, 0, HeadSlice(0, 1, 1)),
    ]
    assert kv_routes([(0, 2)], [(0, 1), (1, 2)]) == [
        Route(0, 0, HeadSlice(0, 0, 1)),
        Route(0, 1, HeadSlice(1, 0, 1)),
    ]
    assert kv_routes([(0, 2), (2, 4)], [(0, 1), (1, 2), (2, 3), (3, 4)]) == [
        Route(0, 0, HeadSlice(0, 0, 1)), Route(0, 1, HeadSlice(1, 0, 1)),
        Route(1, 2, HeadSlice(0, 0, 1)), Route(1, 3, HeadSlice(1, 0, 1)),
    ]  # fmt: skip
    # One KV head replicated on every rank: sent once, by rank 0, to every receiving rank.
    assert kv_routes([(0, 1), (0, 1)], [(0, 1)]) == [Route(0, 0, None)]
    assert kv_routes([(0, 1)], [(0, 1), (0, 1)]) == [Route(0, 0, None), Route(0, 1, None)]
    assert parse_rank_id(rank_node_id("prefill-a.tp1of2", 1, 2)) == ("prefill-a.tp1of2", 1, 2)
    assert parse_rank_id("prefill-a") is None


@pytest.mark.parametrize(("prefill_world", "decode_world"), [(2, 2), (2, 1), (1, 2)])
def test_every_decode_rank_gets_its_heads_and_kv_done_counts_once_every_route_delivered(
    prefill_world: int, decode_world: int, closing: list[object]
) -> None:
    prefill = make_node("p", prefill_world, 1, closing)
    decode = make_node("d", decode_world, 10, closing)
    peer = published(decode)
    assert prefill.ranks.serves(peer)
    key = prefill.ranks.connect(peer)

    # A layer plan, as a step would run it on each rank, then the rest in one piece.
    plan = [RankWrite(key, "r1", [1, 2], [5, 6])]
    on_every_rank(prefill, "on_layer_stored", 0, plan)
    prefill.ranks.write(key, "r1", [1], [1, 2], [5, 6])
    assert settle(prefill.ranks, "r1")[0] is TransferState.DONE
    routes = kv_routes(heads_of(prefill_world), heads_of(decode_world))
    if len({r.src for r in routes}) > 1:  # rank 0's kv-done alone completes nothing
        prefill.ranks.local.write(key, "r1", [1], [2], [6], kv_done("r1"))
        assert arrivals(decode.ranks, 1, wait_s=0.5) == []
    prefill.ranks.write(key, "r1", [1], [2], [6], kv_done("r1"))
    assert arrivals(decode.ranks, 1) == [("p", kv_done("r1"))]
    assert settle(prefill.ranks, "r1")[:2] == (TransferState.DONE, None)

    whole_prefill = [torch.cat([p[layer] for p in prefill.pools], dim=-2) for layer in range(LAYERS)]
    for rank, (first, stop) in enumerate(heads_of(decode_world)):
        for layer in range(LAYERS):
            got = decode.pools[rank][layer][5:7]
            assert torch.equal(got, whole_prefill[layer][1:3, :, :, first:stop]), (rank, layer)


def test_a_partial_arrival_is_forgotten_by_a_new_reservation_of_the_request(closing: list[object]) -> None:
    prefill, decode = make_node("p", 2, 1, closing), make_node("d", 2, 10, closing)
    key = prefill.ranks.connect(published(decode))
    prefill.ranks.local.write(key, "r2", [1], [0], [0], kv_done("r2"))  # attempt 1: only rank 0's arrived
    assert settle(prefill.ranks, "r2")[0] is TransferState.DONE
    assert arrivals(decode.ranks, 1, wait_s=0.5) == []
    decode.ranks.discard_arrivals("r2")  # the decode node reserves r2 anew
    prefill.ranks.channels[0].call("write", key, "r2", [1], [0], [0], kv_done("r2"))  # attempt 2, rank 1
    assert arrivals(decode.ranks, 1, wait_s=0.5) == []  # rank 0's old kv-done does not complete attempt 2


def test_writes_to_an_unconnected_peer_or_a_gone_rank_show_as_failed(closing: list[object]) -> None:
    node = make_node("p", 2, 1, closing)
    node.ranks.write("nobody", "r3", [0], [0], [0])
    state, error, _ = node.ranks.state("r3")
    assert state is TransferState.FAILED and "not connected" in (error or "")
    node.ranks.forget("r3")
    assert node.ranks.state("r3")[0] is TransferState.DONE  # nothing left of it
    node.ranks.channels[0].close()  # rank 1 gone
    state, error, _ = node.ranks.state("r4")
    assert state is TransferState.FAILED and "rank 1" in (error or "")


def test_which_peers_go_rank_to_rank(closing: list[object]) -> None:
    split, single = make_node("p", 2, 1, closing), make_node("q", 1, 5, closing)
    described = published(make_node("r", 2, 7, closing))
    assert split.ranks.serves(described) and single.ranks.serves(described)
    assert split.ranks.serves(published(single))
    assert not single.ranks.serves(published(make_node("s", 1, 9, closing)))  # TP 1 to TP 1: the node's path
    assert not split.ranks.serves(dataclasses.replace(described, tp_ranks=()))  # a node without ranks
    assert not split.ranks.serves(dataclasses.replace(described, tp_ranks=described.tp_ranks[::-1]))
    three = described.tp_ranks + described.tp_ranks[:1]
    assert not split.ranks.serves(
        dataclasses.replace(described, tp_ranks=three)
    )  # 2 KV heads do not split 3 ways


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
