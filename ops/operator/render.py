"""render(): a SplitserveCluster's spec -> the Kubernetes objects that run it. Pure: no API calls, no clock.

For a cluster NAME in namespace NS it makes
- ServiceAccount NAME (no API token mounted: no component calls the API, so the pods get no Role either),
- ConfigMap NAME-config: environment every pod reads (HF offline mode, UCX transports, the OTLP endpoint),
- Deployments NAME-router, NAME-prefill, NAME-decode (pods.py), NAME-colocated when that pool has pods (or
  autoscaling), and NAME-redis when Redis is managed,
- Services NAME-router (ClusterIP: gRPC 50051, HTTP 8000), NAME-prefill, NAME-decode and NAME-colocated (headless:
  DNS and Prometheus discovery only, since routers find nodes through Redis), and NAME-redis when managed,
- a PodDisruptionBudget per pool (one pod at a time: node drains finish before the next eviction),
- an autoscaling/v2 HorizontalPodAutoscaler per pool with autoscaling set.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from ops.operator.labels import (
    GRPC_PORT,
    HTTP_PORT,
    REDIS_PORT,
    Owner,
    metadata,
    object_name,
    selector_labels,
)
from ops.operator.pods import deployment, redis_deployment
from ops.operator.spec import COLOCATED, Autoscaling, ClusterSpec, Pool, check_cluster_name, parse_spec


def render(
    name: str, namespace: str, spec: ClusterSpec | Mapping[str, Any], owner: Owner | None = None
) -> list[dict[str, Any]]:
    """The objects for cluster `name`; a raw `.spec` mapping is parsed first (SpecError if it is invalid)."""
    check_cluster_name(name)
    parsed = spec if isinstance(spec, ClusterSpec) else parse_spec(spec)
    check_cluster_name(name, colocated=any(pool.role == COLOCATED for pool in parsed.pools()))
    config = _config_map(name, namespace, parsed, owner)
    config_hash = hashlib.sha256(json.dumps(config["data"], sort_keys=True).encode()).hexdigest()[:16]
    objects: list[dict[str, Any]] = [_service_account(name, namespace, owner), config]
    if parsed.redis.external_url is None:
        objects += [
            redis_deployment(name, namespace, parsed, owner),
            _service(name, namespace, "redis", [("redis", REDIS_PORT)], headless=False, owner=owner),
        ]
    for pool in parsed.pools():
        objects.append(deployment(name, namespace, parsed, pool, config_hash, owner))
        objects.append(_pool_service(name, namespace, pool, owner))
        objects.append(_disruption_budget(name, namespace, pool, owner))
        if pool.autoscaling is not None:
            objects.append(_autoscaler(name, namespace, pool.role, pool.autoscaling, owner))
    return objects


def _service_account(cluster: str, namespace: str, owner: Owner | None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata(cluster, namespace, cluster, "splitserve", owner),
        "automountServiceAccountToken": False,
    }


def _config_map(cluster: str, namespace: str, spec: ClusterSpec, owner: Owner | None) -> dict[str, Any]:
    data = {"HF_HUB_OFFLINE": "1"}  # models come from the mounted directory; pods never download
    if spec.kv_transfer.ucx_transports is not None:
        data["UCX_TLS"] = spec.kv_transfer.ucx_transports
    if spec.otlp_endpoint is not None:
        data["OTEL_EXPORTER_OTLP_ENDPOINT"] = spec.otlp_endpoint
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(object_name(cluster, "config"), namespace, cluster, "config", owner),
        "data": data,
    }


def _pool_service(cluster: str, namespace: str, pool: Pool, owner: Owner | None) -> dict[str, Any]:
    if pool.role == "router":
        ports = [("grpc", GRPC_PORT), ("http", HTTP_PORT)]
        return _service(cluster, namespace, "router", ports, headless=False, owner=owner)
    return _service(cluster, namespace, pool.role, [("grpc", GRPC_PORT), ("metrics", HTTP_PORT)], True, owner)


def _service(
    cluster: str,
    namespace: str,
    component: str,
    ports: list[tuple[str, int]],
    headless: bool,
    owner: Owner | None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "selector": selector_labels(cluster, component),
        "ports": [
            {"name": name, "port": port, "targetPort": port, "protocol": "TCP"} for name, port in ports
        ],
    }
    if headless:
        spec["clusterIP"] = "None"
        # Metrics scrapers may want a node that is starting or draining too.
        spec["publishNotReadyAddresses"] = True
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(object_name(cluster, component), namespace, cluster, component, owner),
        "spec": spec,
    }


def _disruption_budget(cluster: str, namespace: str, pool: Pool, owner: Owner | None) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(object_name(cluster, pool.role), namespace, cluster, pool.role, owner),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(cluster, pool.role)}},
    }


def _autoscaler(
    cluster: str, namespace: str, role: str, scaling: Autoscaling, owner: Owner | None
) -> dict[str, Any]:
    if scaling.pods_metric is not None:
        metric: dict[str, Any] = {
            "type": "Pods",
            "pods": {
                "metric": {"name": scaling.pods_metric.name},
                "target": {"type": "AverageValue", "averageValue": scaling.pods_metric.average_value},
            },
        }
    else:
        metric = {
            "type": "Resource",
            "resource": {
                "name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": scaling.target_cpu_percent},
            },
        }
    name = object_name(cluster, role)
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata(name, namespace, cluster, role, owner),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": scaling.min_replicas,
            "maxReplicas": scaling.max_replicas,
            "metrics": [metric],
        },
    }
