"""What GET /readyz answers: can this router place a request now, by its view of the cluster?

Ready means both:
1. The view is fresh: its last full resync with Redis is at most STALE_VIEW_S old. A router whose Redis is gone keeps
   serving from its last view (nodes may well be up), but it no longer knows, and says so.
2. A usable prefill path exists: a usable colocated node, or a usable prefill node and a usable decode node. Usable:
   registered with a live lease (a node is in the view while its key exists, or for one TTL after a Redis outage
   until Redis lists it again: not usable then), load reports flowing (the load key shares the lease's TTL) and not
   draining.

The answer is a signal for probes and load balancers only; requests are placed as before either way.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.state import ROLES, ClusterView, NodeState

STALE_VIEW_S = 3.0  # six missed resyncs (every 0.5 s): Redis is gone or unreachable, not merely slow


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    reason: str  # why not ready; "" when ready
    usable: dict[str, int]  # usable nodes per role
    registered: dict[str, int]  # nodes in the view per role
    view_age_s: float  # seconds since the view's last full resync with Redis

    def body(self) -> dict[str, object]:
        body: dict[str, object] = {
            "ready": self.ready,
            "nodes": sum(self.registered.values()),
            "usable": self.usable,
            "registered": self.registered,
            "view_age_s": round(self.view_age_s, 3) if self.view_age_s != float("inf") else None,
        }
        if not self.ready:
            body["reason"] = self.reason
        return body


def usable(state: NodeState, unconfirmed: frozenset[str] = frozenset()) -> bool:
    """Leased (not merely kept from before a Redis outage), reporting load, not draining."""
    return state.info.node_id not in unconfirmed and state.load is not None and not state.load.draining


def readiness(view: ClusterView) -> Readiness:
    nodes = view.nodes()
    registered: dict[str, int] = {role: sum(1 for n in nodes if n.info.role == role) for role in ROLES}
    unconfirmed = view.unconfirmed()
    counts: dict[str, int] = {
        role: sum(1 for n in nodes if n.info.role == role and usable(n, unconfirmed)) for role in ROLES
    }
    age = view.sync_age_s()
    reason = ""
    if age > STALE_VIEW_S:
        reason = f"no contact with Redis for {age:.1f} s: the cluster view may be stale"
    elif not (counts["colocated"] or (counts["prefill"] and counts["decode"])):
        per_role = ", ".join(f"{role} {counts[role]}/{registered[role]}" for role in ROLES)
        reason = f"no usable prefill path (usable/registered nodes: {per_role})"
    return Readiness(not reason, reason, counts, registered, age)
