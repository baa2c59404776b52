"""Names, labels, ports and object metadata shared by everything render() makes and by the operator's pruning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FIELD_MANAGER = "splitserve-operator"
GROUP = "splitserve.io"
VERSION = "v1alpha1"
KIND = "SplitserveCluster"
PLURAL = "splitserveclusters"

GRPC_PORT = 50051  # the router's public gRPC API; on nodes, the node's own gRPC service
HTTP_PORT = 8000  # the router's OpenAI-compatible HTTP and /metrics; on nodes, /metrics only
REDIS_PORT = 6379

INSTANCE = "app.kubernetes.io/instance"
COMPONENT = "app.kubernetes.io/component"
MANAGED_BY = "app.kubernetes.io/managed-by"
CONFIG_HASH = "splitserve.io/config-hash"


@dataclass(frozen=True, slots=True)
class Owner:
    """The SplitserveCluster every rendered object belongs to (garbage-collected with it)."""

    api_version: str
    kind: str
    name: str
    uid: str

    @classmethod
    def of(cls, body: Any) -> Owner:
        return cls(body["apiVersion"], body["kind"], body["metadata"]["name"], body["metadata"]["uid"])


def object_name(cluster: str, component: str) -> str:
    return f"{cluster}-{component}"


def selector_labels(cluster: str, component: str) -> dict[str, str]:
    """The labels a Deployment selects its pods by: never change these (selectors are immutable)."""
    return {"app.kubernetes.io/name": "splitserve", INSTANCE: cluster, COMPONENT: component}


def labels(cluster: str, component: str) -> dict[str, str]:
    return {
        **selector_labels(cluster, component),
        "app.kubernetes.io/part-of": "splitserve",
        MANAGED_BY: FIELD_MANAGER,
    }


def metadata(name: str, namespace: str, cluster: str, component: str, owner: Owner | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels(cluster, component)}
    if owner is not None:
        meta["ownerReferences"] = [
            {
                "apiVersion": owner.api_version,
                "kind": owner.kind,
                "name": owner.name,
                "uid": owner.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    return meta


def managed_selector(cluster: str) -> str:
    """A label selector for every object the operator made for this cluster (what pruning may delete)."""
    return f"{INSTANCE}={cluster},{MANAGED_BY}={FIELD_MANAGER}"
