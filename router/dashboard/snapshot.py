"""The dashboard's data: one JSON-ready snapshot of the cluster and the router's recent requests.

Built from what the router already holds in memory (its cluster view, placement policy and request log), so a
snapshot costs no Redis or node round trip and the page can refresh every second.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from cluster.state import ClusterView, NodeState
from router.request_log import RequestLog

# A node whose last load report is older than this shows as "stale" (nodes report at least every 100 ms).
STALE_AFTER_S = 3.0
POOLS = ("prefill", "decode", "colocated")


@dataclass(slots=True)
class DashboardSource:
    """What the router lends the dashboard: all read-only here."""

    model: str
    view: ClusterView
    requests: RequestLog
    policy: Any  # router.policy.PlacementPolicy: its name, and a budget or borrowed nodes where it has them
    api_key_required: bool


def snapshot(source: DashboardSource, series_seconds: int = 120, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    borrowed = _borrowed(source.policy)
    nodes = [_node(state, now, borrowed) for state in source.view.nodes()]
    nodes.sort(key=lambda n: (POOLS.index(n["pool"]), n["machine_type"], n["node_id"]))
    budget = _budget_w(source.policy)
    log = source.requests
    return {
        "at": now,
        "model": source.model,
        "policy": getattr(source.policy, "name", "?"),
        "api_key_required": source.api_key_required,
        "cluster": {
            "nodes": len(nodes),
            "power_w": sum(n["power_w"] for n in nodes),
            "rated_power_w": sum(n["max_power_w"] for n in nodes),
            "power_budget_w": budget,
            "cost_per_hour": sum(n["cost_per_hour"] for n in nodes),
            "pools": {pool: _pool(pool, nodes) for pool in POOLS},
        },
        "nodes": nodes,
        "requests": {
            "running": log.running,
            "finished": log.finished,
            "failed": log.failed,
            "series": log.series(series_seconds),
            "recent": [r.to_json() for r in log.recent(20)],
            "errors": log.errors(20),
        },
    }


def _node(state: NodeState, now: float, borrowed: dict[str, str]) -> dict[str, Any]:
    info, load = state.info, state.load
    node: dict[str, Any] = {
        "node_id": info.node_id,
        "pool": info.role,
        "machine_type": info.machine_type,
        "address": info.address,
        "cost_per_hour": info.cost_per_hour,
        "max_power_w": info.max_power_w,
        "kv_block_size": info.block_size,
        "uptime_s": max(0.0, now - info.started_at),
        "borrowed": info.node_id in borrowed,
        "health": _health(state, now),
        "power_w": 0.0,
        "power_source": "",
        "queued_prompt_tokens": 0,
        "running_requests": 0,
        "kv_used_blocks": 0,
        "kv_total_blocks": info.kv_capacity_blocks,
        "report_age_s": None,
        "prefix_hit_rate": None,  # of the full prompt blocks looked up since the node started (None: none yet)
    }
    if load is not None:
        node.update(
            power_w=load.power_w,
            power_source=load.power_source,
            queued_prompt_tokens=load.queued_prompt_tokens,
            running_requests=load.running_requests,
            kv_used_blocks=load.total_kv_blocks - load.free_kv_blocks,
            kv_total_blocks=load.total_kv_blocks,
            report_age_s=max(0.0, now - load.timestamp),
            prefix_hit_rate=(
                load.prefix_hit_blocks / load.prefix_queried_blocks if load.prefix_queried_blocks else None
            ),
        )
    return node


def _health(state: NodeState, now: float) -> str:
    """ok | draining (finishing its work, taking none) | drained (draining with nothing left) | stale | starting."""
    load = state.load
    if load is None:
        return "starting"
    if now - load.timestamp > STALE_AFTER_S:
        return "stale"
    if load.draining:
        idle = load.running_requests == 0 and load.queued_prompt_tokens == 0
        return "drained" if idle else "draining"
    return "ok"


def _pool(pool: str, nodes: list[dict[str, Any]]) -> dict[str, Any]:
    members = [n for n in nodes if n["pool"] == pool]
    return {
        "nodes": len(members),
        "healthy": sum(n["health"] == "ok" for n in members),
        "queued_prompt_tokens": sum(n["queued_prompt_tokens"] for n in members),
        "running_requests": sum(n["running_requests"] for n in members),
        "power_w": sum(n["power_w"] for n in members),
        "cost_per_hour": sum(n["cost_per_hour"] for n in members),
    }


def _budget_w(policy: Any) -> float | None:
    """The power budget the placement keeps to, if any (power policy, or a mixed pool around it)."""
    budget = getattr(policy, "budget_w", None)
    if budget is None and hasattr(policy, "inner"):
        budget = getattr(policy.inner, "budget_w", None)
    return float(budget) if budget is not None else None


def _borrowed(policy: Any) -> dict[str, str]:
    borrowed = getattr(policy, "borrowed", None)
    return dict(borrowed) if isinstance(borrowed, dict) else {}
