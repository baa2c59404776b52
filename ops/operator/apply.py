"""Server-side apply of rendered objects, pruning of the ones a spec no longer renders, and reading Deployments back.

Everything goes through the `kubernetes` client's DynamicClient, so one code path serves every kind render() makes.
Server-side apply with one field manager means the operator owns exactly the fields it renders: a Deployment whose
replicas it leaves out (autoscaling) keeps whatever the HPA sets, and a user's own labels or annotations survive.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ops.operator.cluster_secrets import create_if_absent
from ops.operator.labels import COMPONENT, FIELD_MANAGER, managed_selector

# Every kind render() can make: pruning looks for leftovers of each. Not Secrets: the generated ones are created once
# (create_secret_if_absent) and live as long as their cluster, so pruning never deletes a token pods still use.
MANAGED_KINDS = (
    ("v1", "ServiceAccount"),
    ("v1", "ConfigMap"),
    ("v1", "Service"),
    ("apps/v1", "Deployment"),
    ("policy/v1", "PodDisruptionBudget"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
)


class ClusterApplier:
    """Applies one cluster's objects; kubernetes.client.ApiException propagates for the caller to retry."""

    def __init__(self, api_client: Any = None) -> None:
        from kubernetes import client, dynamic

        self._client = dynamic.DynamicClient(api_client or client.ApiClient())

    def apply(self, objects: Iterable[dict[str, Any]]) -> None:
        for body in objects:
            resource = self._resource(body["apiVersion"], body["kind"])
            self._client.server_side_apply(
                resource,
                body=body,
                namespace=body["metadata"].get("namespace"),
                field_manager=FIELD_MANAGER,
                # The operator is the source of truth for what it renders: take fields back from kubectl edits.
                force_conflicts=True,
            )

    def create_secret_if_absent(self, body: dict[str, Any]) -> bool:
        """Create the Secret `body` unless one of its name exists (never overwritten); True if it was created."""
        return create_if_absent(self._resource("v1", "Secret"), body)

    def prune(self, namespace: str, cluster: str, keep: Iterable[dict[str, Any]]) -> list[str]:
        """Delete this cluster's managed objects that `keep` no longer holds (an HPA after autoscaling was turned
        off, the Redis after switching to an external one); returns "Kind/name" of each deleted object."""
        wanted = {(o["kind"], o["metadata"]["name"]) for o in keep}
        deleted = []
        for api_version, kind in MANAGED_KINDS:
            resource = self._resource(api_version, kind)
            found = resource.get(namespace=namespace, label_selector=managed_selector(cluster))
            for item in found.items:
                if (kind, item.metadata.name) not in wanted:
                    resource.delete(name=item.metadata.name, namespace=namespace)
                    deleted.append(f"{kind}/{item.metadata.name}")
        return deleted

    def deployments(self, namespace: str, cluster: str) -> dict[str, dict[str, Any]]:
        """This cluster's Deployments as plain dicts, keyed by component (router, prefill, decode, redis)."""
        resource = self._resource("apps/v1", "Deployment")
        found = resource.get(namespace=namespace, label_selector=managed_selector(cluster))
        by_component = {}
        for item in found.items:
            body = item.to_dict()
            component = (body["metadata"].get("labels") or {}).get(COMPONENT)
            if component:
                by_component[component] = body
        return by_component

    def _resource(self, api_version: str, kind: str) -> Any:
        return self._client.resources.get(api_version=api_version, kind=kind)
