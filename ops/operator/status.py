"""A SplitserveCluster's status from its Deployments: pure, so every condition's rule is tested without an API server.

Conditions follow the Kubernetes convention (type, status, reason, message, lastTransitionTime, observedGeneration):
- Ready: every Deployment has all its desired pods updated and ready (only the pools render() made count: a
  colocated pool with no replicas has no Deployment and is not waited for).
- Progressing: a rollout or scale-up is under way (or the objects are still being created).
- Degraded: the spec is invalid (the message says which field and why), the API server refused the objects, or
  a Deployment reports that its rollout stalled (ProgressDeadlineExceeded, ReplicaFailure).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ops.operator.spec import POOLS


@dataclass(frozen=True, slots=True)
class PoolState:
    """What one Deployment reports."""

    exists: bool
    desired: int
    ready: int
    updated: int
    replicas: int
    observed: bool  # the Deployment controller has seen the latest template
    stalled: str | None  # why the rollout stopped making progress, if it did

    @classmethod
    def of(cls, deployment: Mapping[str, Any] | None) -> PoolState:
        if deployment is None:
            return cls(False, 0, 0, 0, 0, False, None)
        spec = deployment.get("spec") or {}
        status = deployment.get("status") or {}
        generation = (deployment.get("metadata") or {}).get("generation", 0)
        return cls(
            exists=True,
            desired=int(spec.get("replicas", 1)),
            ready=int(status.get("readyReplicas") or 0),
            updated=int(status.get("updatedReplicas") or 0),
            replicas=int(status.get("replicas") or 0),
            observed=int(status.get("observedGeneration") or 0) >= int(generation),
            stalled=_stall_reason(status.get("conditions") or []),
        )

    @property
    def settled(self) -> bool:
        return self.exists and self.observed and self.ready >= self.desired and self.updated >= self.desired


def cluster_status(
    generation: int,
    pools: Mapping[str, PoolState],
    previous_conditions: list[dict[str, Any]],
    now: str,
    spec_error: str | None = None,
    apply_error: str | None = None,
) -> dict[str, Any]:
    """The status to write: observedGeneration, conditions and per-pool counts; `now` is an RFC 3339 time.

    spec_error: why the spec cannot be rendered. apply_error: why the API server refused the rendered objects (the
    operator retries); what runs then is unknown, so Ready and Progressing say Unknown."""
    if spec_error is not None:
        states = {
            "Ready": ("False", "InvalidSpec", "the spec is invalid: see the Degraded condition"),
            "Progressing": ("False", "InvalidSpec", "nothing is rolled out until the spec is fixed"),
            "Degraded": ("True", "InvalidSpec", spec_error),
        }
    elif apply_error is not None:
        states = {
            "Ready": (
                "Unknown",
                "ApplyFailed",
                "the objects could not be applied: see the Degraded condition",
            ),
            "Progressing": ("Unknown", "ApplyFailed", "retrying"),
            "Degraded": ("True", "ApplyFailed", apply_error),
        }
    else:
        states = _health(pools)
    previous = {c.get("type"): c for c in previous_conditions}
    conditions = [
        _condition(kind, status, reason, message, generation, now, previous.get(kind))
        for kind, (status, reason, message) in states.items()
    ]
    return {"observedGeneration": generation, "conditions": conditions, "pools": _pool_counts(pools)}


def _pool_counts(pools: Mapping[str, PoolState]) -> dict[str, dict[str, int] | None]:
    counts: dict[str, dict[str, int] | None] = {
        role: {"replicas": state.replicas, "readyReplicas": state.ready, "updatedReplicas": state.updated}
        for role, state in pools.items()
        if role in POOLS
    }
    if counts:
        # The status is merge-patched: null deletes the counts of a pool that is no longer rendered (a colocated
        # pool scaled to 0), which would otherwise linger. No pools at all (spec or apply error) keeps the last ones.
        counts.update({role: None for role in POOLS if role not in counts})
    return counts


def _health(pools: Mapping[str, PoolState]) -> dict[str, tuple[str, str, str]]:
    stalled = [f"{role}: {state.stalled}" for role, state in pools.items() if state.stalled]
    waiting = [role for role, state in pools.items() if not state.settled]
    if not waiting:
        ready = ("True", "AllPoolsReady", "every pool has its desired pods ready")
        progressing = ("False", "Stable", "no rollout in progress")
    else:
        counts = ", ".join(_progress(role, pools[role]) for role in waiting)
        ready = ("False", "PoolsNotReady", counts)
        progressing = ("True", "RollingOut", counts)
    degraded = ("True", "RolloutStalled", "; ".join(stalled)) if stalled else ("False", "AsExpected", "")
    return {"Ready": ready, "Progressing": progressing, "Degraded": degraded}


def _progress(role: str, state: PoolState) -> str:
    if not state.exists:
        return f"{role}: not created yet"
    return f"{role}: {state.ready}/{state.desired} ready, {state.updated} updated"


def _condition(
    kind: str,
    status: str,
    reason: str,
    message: str,
    generation: int,
    now: str,
    previous: Mapping[str, Any] | None,
) -> dict[str, Any]:
    # The transition time moves only when the status flips, as kubectl and dashboards expect.
    unchanged = (
        previous is not None and previous.get("status") == status and previous.get("lastTransitionTime")
    )
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": previous["lastTransitionTime"] if unchanged and previous else now,
    }


def _stall_reason(conditions: list[Mapping[str, Any]]) -> str | None:
    for condition in conditions:
        kind, status, reason = condition.get("type"), condition.get("status"), condition.get("reason")
        if kind == "Progressing" and status == "False" and reason == "ProgressDeadlineExceeded":
            return str(condition.get("message") or reason)
        if kind == "ReplicaFailure" and status == "True":
            return str(condition.get("message") or reason or "replica failure")
    return None
