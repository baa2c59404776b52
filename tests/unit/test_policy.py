"""Join-the-shortest-queue placement over the router's index: pair choice, capacity, exclusions, draining, fallback."""

from __future__ import annotations

import pytest

from cluster.state import LoadReport, NodeInfo, NodeState
from router.cluster_index import ClusterIndex
from router.load_tracker import LoadTracker
from router.policies import create_policy
from router.policy import JoinShortestQueue, Placement, PlacementRequest

REQ = PlacementRequest(prompt_tokens=100, max_total_tokens=200)


def node(
    node_id: str, role: str, pending: int = 0, free: int = 100, running: int = 0, draining: bool = False
):
    info = NodeInfo(node_id, role, "127.0.0.1:1", "m", "cpu", 100, 16)  # type: ignore[arg-type]
    return NodeState(
        info, LoadReport(node_id, pending, running, free, 100, timestamp=1.0, draining=draining), "g"
    )


def place(nodes, tracker: LoadTracker | None = None, exclude=(), request=REQ) -> Placement | None:
    index = ClusterIndex()
    index.update(tuple(nodes))
    return JoinShortestQueue().place(request, index.for_request(tracker or LoadTracker(), exclude))


def test_prefill_with_fewest_pending_tokens_and_decode_with_most_free_blocks() -> None:
    nodes = [node("p1", "prefill", pending=500), node("p2", "prefill", pending=20),
             node("d1", "decode", free=30), node("d2", "decode", free=80)]  # fmt: skip
    assert place(nodes) == Placement(prefill="p2", decode="d2")


def test_ties_on_pending_tokens_go_to_the_less_busy_node() -> None:
    nodes = [node("p1", "prefill", running=5), node("p2", "prefill", running=1), node("d", "decode")]
    assert place(nodes) == Placement(prefill="p2", decode="d")


def test_decode_without_room_for_the_prompt_is_skipped() -> None:
    nodes = [node("p", "prefill"), node("d-full", "decode", free=6), node("d-ok", "decode", free=7)]
    assert place(nodes) == Placement(prefill="p", decode="d-ok")  # 100 tokens = 7 blocks of 16


def test_excluded_and_draining_nodes_are_never_picked() -> None:
    nodes = [node("p1", "prefill"), node("p2", "prefill", pending=900), node("p3", "prefill", draining=True),
             node("d1", "decode")]  # fmt: skip
    assert place(nodes, exclude={"p1"}) == Placement(prefill="p2", decode="d1")


def test_unreported_picks_steer_a_burst_away_from_the_idlest_node() -> None:
    nodes = [node("p1", "prefill", pending=0), node("p2", "prefill", pending=50), node("d", "decode")]
    tracker = LoadTracker()
    tracker.picked("p1", "r1", 100, 0)  # picked after p1's last report (timestamp 1.0)
    assert place(nodes, tracker) == Placement(prefill="p2", decode="d")
    tracker.done("p1", "r1")
    assert place(nodes, tracker) == Placement(prefill="p1", decode="d")


def test_colocated_serves_when_no_pair_exists() -> None:
    nodes = [node("p", "prefill"), node("c1", "colocated", pending=50), node("c2", "colocated", pending=10)]
    assert place(nodes) == Placement(colocated="c2")


def test_nothing_fits_returns_none() -> None:
    assert place([node("d", "decode")]) is None
    assert place([]) is None


def test_unknown_policy_name_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown placement policy 'fastest'"):
        create_policy("fastest")
    assert create_policy("jsq").name == "jsq"
