"""The dashboard's snapshot, built from constructed cluster states (no Redis: a fixed list of node states)."""

from __future__ import annotations

import pytest

from cluster.state import LoadReport, NodeInfo, NodeState
from router.dashboard.snapshot import STALE_AFTER_S, DashboardSource, snapshot
from router.policies import create_policy
from router.request_log import RequestLog

NOW = 1_000_000.0


class FixedView:
    """The two reads the snapshot makes of a ClusterView, over a fixed list."""

    def __init__(self, states: list[NodeState]) -> None:
        self.states = states

    def nodes(self, role=None) -> tuple[NodeState, ...]:
        return tuple(s for s in self.states if role is None or s.info.role == role)

    def get(self, node_id: str) -> NodeState | None:
        return next((s for s in self.states if s.info.node_id == node_id), None)


def node(
    node_id: str, role: str, *, load: dict | None = None, age_s: float = 0.1, machine: str = "cpu"
) -> NodeState:
    info = NodeInfo(
        node_id=node_id, role=role, address="127.0.0.1:1", model="m", machine_type=machine,  # type: ignore[arg-type]
        kv_capacity_blocks=100, block_size=16, started_at=NOW - 60, cost_per_hour=2.0, idle_power_w=50.0,
        max_power_w=400.0,
    )  # fmt: skip
    report = None
    if load is not None:
        fields = {
            "queued_prompt_tokens": 0,
            "running_requests": 0,
            "free_kv_blocks": 100,
            "total_kv_blocks": 100,
        }
        report = LoadReport(node_id=node_id, timestamp=NOW - age_s, power_w=120.0, **{**fields, **load})
    return NodeState(info, report, "g")


def build(states: list[NodeState], policy=None) -> dict:
    source = DashboardSource("m", FixedView(states), RequestLog(), policy or create_policy("jsq"), False)  # type: ignore[arg-type]
    return snapshot(source, now=NOW)


def test_health_follows_the_load_report() -> None:
    snap = build(
        [
            node("p0", "prefill", load={}),
            node("d0", "decode", load={"draining": True, "running_requests": 2}),
            node("d1", "decode", load={"draining": True}),
            node("d2", "decode", load={}, age_s=STALE_AFTER_S + 1),
            node("c0", "colocated"),
        ]
    )
    health = {n["node_id"]: n["health"] for n in snap["nodes"]}
    assert health == {"p0": "ok", "d0": "draining", "d1": "drained", "d2": "stale", "c0": "starting"}
    assert snap["cluster"]["pools"]["decode"] == pytest.approx(
        {"nodes": 3, "healthy": 0, "queued_prompt_tokens": 0, "running_requests": 2, "power_w": 360.0,
         "cost_per_hour": 6.0}
    )  # fmt: skip


def test_nodes_are_listed_by_pool_then_machine_type_with_kv_use_power_and_cost() -> None:
    snap = build(
        [
            node("c0", "colocated", load={}),
            node("d0", "decode", load={"free_kv_blocks": 75}, machine="dgx-h100-cap"),
            node("p1", "prefill", load={}, machine="dgx-h100"),
            node("p0", "prefill", load={}, machine="dgx-a100"),
        ]
    )
    assert [n["node_id"] for n in snap["nodes"]] == ["p0", "p1", "d0", "c0"]
    d0 = snap["nodes"][2]
    assert (d0["kv_used_blocks"], d0["kv_total_blocks"], d0["power_w"]) == (25, 100, 120.0)
    assert snap["cluster"]["power_w"] == pytest.approx(480.0)
    assert snap["cluster"]["rated_power_w"] == pytest.approx(1600.0)
    assert snap["cluster"]["cost_per_hour"] == pytest.approx(8.0)
    assert snap["cluster"]["power_budget_w"] is None


def test_the_power_budget_comes_from_the_policy_even_inside_a_mixed_pool() -> None:
    assert build([], create_policy("power", budget_w=5000))["cluster"]["power_budget_w"] == 5000.0
    mixed = create_policy("mixed", inner="power", budget_w=7000)
    assert build([], mixed)["cluster"]["power_budget_w"] == 7000.0
    assert build([], mixed)["policy"] == "mixed"
