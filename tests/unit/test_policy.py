"""Join-the-shortest-queue placement: pair choice, capacity, exclusions, draining, colocated fallback."""

from __future__ import annotations

import pytest

from router.policy import JoinShortestQueue, NodeSnapshot, Placement, PlacementRequest, create_policy

REQ = PlacementRequest(prompt_tokens=100, max_total_tokens=200)


def node(
    node_id: str, role: str, pending: int = 0, free: int = 100, running: int = 0, draining: bool = False
):
    return NodeSnapshot(node_id, role, pending, running, free, block_size=16, draining=draining)


def test_prefill_with_fewest_pending_tokens_and_decode_with_most_free_blocks() -> None:
    nodes = [node("p1", "prefill", pending=500), node("p2", "prefill", pending=20),
             node("d1", "decode", free=30), node("d2", "decode", free=80)]  # fmt: skip
    assert JoinShortestQueue().place(REQ, nodes) == Placement(prefill="p2", decode="d2")


def test_decode_without_room_for_the_prompt_is_skipped() -> None:
    nodes = [node("p", "prefill"), node("d-full", "decode", free=6), node("d-ok", "decode", free=7)]
    assert JoinShortestQueue().place(REQ, nodes) == Placement(
        prefill="p", decode="d-ok"
    )  # 100 tokens = 7 blocks


def test_excluded_and_draining_nodes_are_never_picked() -> None:
    nodes = [node("p1", "prefill"), node("p2", "prefill", pending=900), node("p3", "prefill", draining=True),
             node("d1", "decode")]  # fmt: skip
    assert JoinShortestQueue().place(REQ, nodes, exclude={"p1"}) == Placement(prefill="p2", decode="d1")


def test_colocated_serves_when_no_pair_exists() -> None:
    nodes = [node("p", "prefill"), node("c1", "colocated", pending=50), node("c2", "colocated", pending=10)]
    assert JoinShortestQueue().place(REQ, nodes) == Placement(colocated="c2")


def test_nothing_fits_returns_none() -> None:
    assert JoinShortestQueue().place(REQ, [node("d", "decode")]) is None
    assert JoinShortestQueue().place(REQ, []) is None


def test_unknown_policy_name_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown placement policy 'fastest'"):
        create_policy("fastest")
    assert create_policy("jsq").name == "jsq"
