"""The SplitserveCluster CustomResourceDefinition (splitserve.io/v1alpha1) as a Python dict.

k8s/crd/splitserveclusters.splitserve.io.yaml is generated from it (`splitserve operator --print-crd`), and a test
checks the committed file against this. The schema is structural (every node typed; checked by
tests/unit/test_k8s_manifests.py), carries spec.py's defaults, and its CEL rules reject the cross-field mistakes
at `kubectl apply` time: replicas and autoscaling together, minReplicas > maxReplicas, more than one model source.

No scale subresource: a CRD has at most one, and a SplitserveCluster has three or four pools; each pool's Deployment
(or its HPA) is what scales, driven by the pool's replicas or autoscaling fields.
"""

from __future__ import annotations

from typing import Any

from ops.operator.labels import GROUP, KIND, PLURAL, VERSION
from ops.operator.spec import (
    COLOCATED,
    DEFAULTS,
    KV_BACKENDS,
    MAX_CLUSTER_NAME,
    MAX_COLOCATED_CLUSTER_NAME,
    POOLS,
    PULL_POLICIES,
)

Schema = dict[str, Any]

REPLICAS_XOR_AUTOSCALING = {
    "rule": "!(has(self.replicas) && has(self.autoscaling))",
    "message": "set replicas or autoscaling, not both",
}


def crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": ["ssc"],
                "categories": ["splitserve"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": _printer_columns(),
                    "schema": {"openAPIV3Schema": _root_schema()},
                }
            ],
        },
    }


def _root_schema() -> Schema:
    return {
        "type": "object",
        "description": "A splitserve cluster: a router pool, prefill and decode node pools and an optional colocated"
        " pool sharing one Redis.",
        "required": ["spec"],
        "properties": {
            "apiVersion": _string(),
            "kind": _string(),
            "metadata": {"type": "object"},
            "spec": _spec_schema(),
            "status": _status_schema(),
        },
        "x-kubernetes-validations": [
            {
                "rule": f"self.metadata.name.size() <= {MAX_CLUSTER_NAME}",
                "message": f"the name must be at most {MAX_CLUSTER_NAME} characters (object names add -prefill)",
            },
            {
                # NAME-colocated is longer than NAME-prefill. As in spec.py, the pool is rendered (and its name
                # matters) when it has autoscaling or replicas > 0; absent or unset replicas mean 0.
                "rule": f"!has(self.spec.{COLOCATED}) || (!has(self.spec.{COLOCATED}.autoscaling)"
                f" && (!has(self.spec.{COLOCATED}.replicas) || self.spec.{COLOCATED}.replicas == 0))"
                f" || self.metadata.name.size() <= {MAX_COLOCATED_CLUSTER_NAME}",
                "message": f"with a colocated pool the name must be at most {MAX_COLOCATED_CLUSTER_NAME} characters"
                " (object names add -colocated)",
            },
        ],
    }


def _spec_schema() -> Schema:
    return _object(
        {
            "image": _string("the splitserve container image", default=DEFAULTS["image"]),
            "imagePullPolicy": _string(default=DEFAULTS["imagePullPolicy"], enum=list(PULL_POLICIES)),
            "model": _model_schema(),
            "router": _pool_schema("router", _router_fields()),
            "prefill": _pool_schema("prefill", _node_fields()),
            "decode": _pool_schema("decode", _node_fields()),
            COLOCATED: _pool_schema(
                COLOCATED,
                _node_fields(),
                default_replicas=DEFAULTS["colocated.replicas"],
                description="nodes that run whole requests (the router's fallback and the baseline); "
                "absent or with replicas 0 (the default), no objects are made for it",
                optional=True,
            ),
            "kvTransfer": _object(
                {
                    "backend": _string(default=DEFAULTS["kvTransfer.backend"], enum=list(KV_BACKENDS)),
                    "ucxTransports": _string("UCX_TLS for nixl, e.g. tcp,self where pods have no RDMA"),
                    "onePieceBelowTokens": _integer(
                        "prefill sends shorter prompts' KV in one piece", minimum=0
                    ),
                },
                description="how prefill nodes write KV into decode nodes",
                default={},
                rules=[
                    {
                        "rule": "!has(self.ucxTransports) || self.backend == 'nixl'",
                        "message": "ucxTransports applies to the nixl backend only",
                    }
                ],
            ),
            "redis": _object(
                {
                    "managed": _object(
                        {
                            "image": _string(default=DEFAULTS["redis.image"]),
                            "resources": _resources_schema(),
                        },
                        description="run Redis as a Deployment of this cluster (the default)",
                    ),
                    "external": _secret_ref(
                        "secretName", DEFAULTS["secret.redisUrlKey"], "a Secret holding the URL"
                    ),
                },
                description="cluster state: a managed Redis (default) or an external one",
                default={},
                rules=[
                    {
                        "rule": "!(has(self.managed) && has(self.external))",
                        "message": "set managed or external, not both",
                    }
                ],
            ),
            "apiKeySecret": _secret_ref("name", DEFAULTS["secret.apiKeyKey"], "the router's API key"),
            "clusterTokenSecret": _secret_ref(
                "name",
                DEFAULTS["secret.clusterTokenKey"],
                "an existing Secret holding the cluster token every node requires and every router sends;"
                " unset, the operator generates the Secret NAME-cluster-token",
            ),
            "machineCatalog": _secret_ref(
                "configMapName", DEFAULTS["machineCatalog.key"], "a ConfigMap with a JSON machine catalog"
            ),
            "otlpEndpoint": _string("export traces over OTLP/gRPC here, e.g. http://collector:4317"),
        },
        required=["model"],
    )


def _model_schema() -> Schema:
    return _object(
        {
            "name": _string(
                "the model's directory under mountPath; the router serves it under this name",
                pattern="^[^/]+$",
            ),
            "mountPath": _string(default=DEFAULTS["model.mountPath"], pattern="^/"),
            "pvcName": _string("a PersistentVolumeClaim holding the model directory"),
            "hostPath": _string("a directory on every node holding the model directory"),
            "demo": _boolean("a tiny random model made in each pod: no volume needed", default=False),
        },
        required=["name"],
        rules=[
            {
                "rule": "(has(self.pvcName) ? 1 : 0) + (has(self.hostPath) ? 1 : 0)"
                " + (has(self.demo) && self.demo ? 1 : 0) == 1",
                "message": "set exactly one of pvcName, hostPath or demo: true",
            }
        ],
    )


def _pool_schema(
    role: str,
    role_fields: dict[str, Schema],
    *,
    default_replicas: int = DEFAULTS["pool.replicas"],
    description: str | None = None,
    optional: bool = False,
) -> Schema:
    fields = {
        # No default: a defaulted replicas would clash with autoscaling; spec.py fills it in when neither is set.
        "replicas": _integer(
            f"pods in the pool (default {default_replicas}); leave unset with autoscaling", minimum=0
        ),
        "autoscaling": _autoscaling_schema(),
        "resources": _resources_schema(),
        "env": _string_map("extra environment variables"),
        "extraArgs": {"type": "array", "items": _string(), "description": f"appended to `splitserve {role}`"},
        "nodeSelector": _string_map(),
        "preStopSleepSeconds": _integer(
            "wait before SIGTERM so endpoints and routers stop sending work",
            minimum=0,
            default=DEFAULTS["pool.preStopSleepSeconds"],
        ),
        **role_fields,
    }
    return _object(
        fields,
        description=description or f"the {role} pool",
        # An optional pool gets no default {}: absent, it stays absent in stored resources.
        default=None if optional else {},
        rules=[REPLICAS_XOR_AUTOSCALING],
    )


def _router_fields() -> dict[str, Schema]:
    return {
        "policy": _string("placement policy (splitserve router --policy)", default=DEFAULTS["router.policy"]),
        "policyOptions": _string_map("--policy-option KEY=VALUE pairs"),
    }


def _node_fields() -> dict[str, Schema]:
    return {
        "machineType": _string(
            "price and power model (--machine-type)", default=DEFAULTS["pool.machineType"]
        ),
        "gpus": _integer(
            "nvidia.com/gpu per pod; > 0 runs on CUDA", minimum=0, default=DEFAULTS["pool.gpus"]
        ),
        "tensorParallelSize": _integer(minimum=1, default=DEFAULTS["pool.tensorParallelSize"]),
        "dtype": _string(default=DEFAULTS["pool.dtype"], enum=["auto", "float32", "bfloat16", "float16"]),
        "threads": _integer("torch CPU threads per pod", minimum=1),
        "kvCacheMB": _integer("the node's paged KV pool", minimum=1),
        "drainTimeoutSeconds": _integer(
            "how long SIGTERM waits for in-flight requests",
            minimum=0,
            default=DEFAULTS["pool.drainTimeoutSeconds"],
        ),
    }


def _autoscaling_schema() -> Schema:
    return _object(
        {
            "minReplicas": _integer(minimum=1, default=DEFAULTS["autoscaling.minReplicas"]),
            "maxReplicas": _integer(minimum=1),
            "targetCPUUtilizationPercent": _integer(
                f"the default target ({DEFAULTS['autoscaling.targetCPUUtilizationPercent']}%) unless podsMetric is set",
                minimum=1,
            ),
            "podsMetric": _object(
                {"name": _string(), "averageValue": _quantity()},
                description="a per-pod custom metric from a metrics adapter",
                required=["name", "averageValue"],
            ),
        },
        description="an autoscaling/v2 HorizontalPodAutoscaler owns the pool's replicas",
        required=["maxReplicas"],
        rules=[
            {
                "rule": "self.minReplicas <= self.maxReplicas",
                "message": "minReplicas must not exceed maxReplicas",
            },
            {
                "rule": "!(has(self.targetCPUUtilizationPercent) && has(self.podsMetric))",
                "message": "set targetCPUUtilizationPercent or podsMetric, not both",
            },
        ],
    )


def _status_schema() -> Schema:
    pool_status = _object(
        {"replicas": _integer(), "readyReplicas": _integer(), "updatedReplicas": _integer()}
    )
    condition = _object(
        {
            "type": _string(),
            "status": _string(enum=["True", "False", "Unknown"]),
            "reason": _string(),
            "message": _string(),
            "observedGeneration": _integer(),
            "lastTransitionTime": {"type": "string", "format": "date-time"},
        },
        required=["type", "status"],
    )
    return _object(
        {
            "observedGeneration": _integer(),
            "conditions": {
                "type": "array",
                "items": condition,
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
            },
            "pools": _object({role: pool_status for role in POOLS}),
        }
    )


def _printer_columns() -> list[dict[str, Any]]:
    columns: list[dict[str, Any]] = [
        {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'}
    ]
    for role in POOLS:
        column: dict[str, Any] = {
            "name": role.capitalize(),
            "type": "integer",
            "jsonPath": f".status.pools.{role}.readyReplicas",
        }
        if role == COLOCATED:  # an optional pool: shown with -o wide, so plain `kubectl get` stays as it was
            column["priority"] = 1
        columns.append(column)
    columns.append(
        {
            "name": "Reason",
            "type": "string",
            "priority": 1,
            "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
        }
    )
    columns.append({"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"})
    return columns


# -- schema builders -------------------------------------------------------------------------------------------


def _object(
    properties: dict[str, Schema],
    *,
    description: str | None = None,
    required: list[str] | None = None,
    default: dict[str, Any] | None = None,
    rules: list[dict[str, str]] | None = None,
) -> Schema:
    schema: Schema = {"type": "object", "properties": properties}
    if description:
        schema["description"] = description
    if required:
        schema["required"] = required
    if default is not None:
        schema["default"] = default
    if rules:
        schema["x-kubernetes-validations"] = rules
    return schema


def _string(
    description: str | None = None,
    *,
    default: str | None = None,
    enum: list[str] | None = None,
    pattern: str | None = None,
) -> Schema:
    schema: Schema = {"type": "string"}
    if description:
        schema["description"] = description
    if default is not None:
        schema["default"] = default
    if enum:
        schema["enum"] = enum
    if pattern:
        schema["pattern"] = pattern
    return schema


def _integer(
    description: str | None = None, *, minimum: int | None = None, default: int | None = None
) -> Schema:
    schema: Schema = {"type": "integer"}
    if description:
        schema["description"] = description
    if minimum is not None:
        schema["minimum"] = minimum
    if default is not None:
        schema["default"] = default
    return schema


def _boolean(description: str, *, default: bool) -> Schema:
    return {"type": "boolean", "description": description, "default": default}


def _string_map(description: str | None = None) -> Schema:
    schema: Schema = {"type": "object", "additionalProperties": {"type": "string"}}
    if description:
        schema["description"] = description
    return schema


def _quantity() -> Schema:
    # Kubernetes quantities are written as 2 or "500m": the structural int-or-string form, as core types use.
    return {
        "anyOf": [{"type": "integer"}, {"type": "string"}],
        "x-kubernetes-int-or-string": True,
        "pattern": r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[numkKMGTPE]|[KMGTPE]i)?$",
    }


def _resources_schema() -> Schema:
    quantities: Schema = {"type": "object", "additionalProperties": _quantity()}
    return _object(
        {"requests": quantities, "limits": quantities},
        description="container resources (GPUs go in the pool's gpus field)",
    )


def _secret_ref(name_field: str, default_key: str, description: str) -> Schema:
    return _object(
        {name_field: _string(), "key": _string(default=default_key)},
        description=description,
        required=[name_field],
    )
