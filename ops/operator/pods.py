"""The Deployments: router, prefill, decode and colocated pods (and the managed Redis) as render() makes them.

Rollouts are SIGTERM-safe: Kubernetes runs the preStop sleep first (the endpoints controller and the routers'
Redis view stop sending new work meanwhile), then sends SIGTERM, on which a node stops taking work, finishes what
it has for up to --drain-timeout seconds and exits 0. terminationGracePeriodSeconds covers both plus a margin for
the servers' own shutdown, so the kubelet never SIGKILLs a node that is still draining.

Credentials come from Secrets (cluster_secrets.py) through the environment, never argv: every node and router reads
SPLITSERVE_CLUSTER_TOKEN, and SPLITSERVE_REDIS_URL, which for the managed Redis carries its password
(SPLITSERVE_REDIS_PASSWORD, expanded by the kubelet) and which the CLI reads in place of --redis-url.
"""

from __future__ import annotations

from typing import Any

from ops.operator.cluster_secrets import cluster_token_ref, redis_password_ref
from ops.operator.labels import (
    CONFIG_HASH,
    GRPC_PORT,
    HTTP_PORT,
    REDIS_PORT,
    Owner,
    metadata,
    object_name,
    selector_labels,
)
from ops.operator.spec import ClusterSpec, Pool, Resources

SHUTDOWN_MARGIN_S = 15  # after the drain: gRPC grace (1 s), deregistration, transport and tracing shutdown
GPU_RESOURCE = "nvidia.com/gpu"
MODEL_VOLUME = "model"
CATALOG_VOLUME = "machine-catalog"
CATALOG_DIR = "/etc/splitserve/machines"
# The same tiny model `splitserve up` makes: its weights and tokenizer are deterministic, so every pod's copy is equal.
DEMO_MODEL_ARGS = [
    "--arch",
    "llama",
    "--layers",
    "4",
    "--hidden",
    "256",
    "--heads",
    "8",
    "--kv-heads",
    "2",
    "--vocab",
    "2048",
]


def deployment(
    cluster: str, namespace: str, spec: ClusterSpec, pool: Pool, config_hash: str, owner: Owner | None
) -> dict[str, Any]:
    name = object_name(cluster, pool.role)
    body: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(name, namespace, cluster, pool.role, owner),
        "spec": {
            "selector": {"matchLabels": selector_labels(cluster, pool.role)},
            # Nodes take minutes to load a model: bring the new one up before the old one drains.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": _pod_template(cluster, spec, pool, config_hash),
        },
    }
    if pool.replicas is not None:  # left out under autoscaling, so the operator never fights the HPA
        body["spec"]["replicas"] = pool.replicas
    return body


def redis_deployment(cluster: str, namespace: str, spec: ClusterSpec, owner: Owner | None) -> dict[str, Any]:
    name = object_name(cluster, "redis")
    password = redis_password_ref(cluster)
    container = {
        "name": "redis",
        "image": spec.redis.image,
        # Cluster state is leases and load reports that nodes rewrite every few seconds: nothing to persist.
        # The kubelet expands $(REDIS_PASSWORD); redis-server then overwrites its process title, so ps shows none.
        "args": ["redis-server", "--save", "", "--appendonly", "no", "--requirepass", "$(REDIS_PASSWORD)"],
        "env": [{"name": "REDIS_PASSWORD", "valueFrom": _secret_key(password.name, password.key)}],
        "ports": [{"name": "redis", "containerPort": REDIS_PORT}],
        "readinessProbe": {"tcpSocket": {"port": REDIS_PORT}, "periodSeconds": 5},
        "livenessProbe": {"tcpSocket": {"port": REDIS_PORT}, "periodSeconds": 10},
        "securityContext": {"allowPrivilegeEscalation": False},
    }
    _set_resources(container, spec.redis.resources, gpus=0)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(name, namespace, cluster, "redis", owner),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector_labels(cluster, "redis")},
            "strategy": {"type": "Recreate"},
            "template": {
                "metadata": {"labels": selector_labels(cluster, "redis")},
                "spec": {"automountServiceAccountToken": False, "containers": [container]},
            },
        },
    }


def termination_grace_s(pool: Pool) -> int:
    return pool.pre_stop_sleep_s + pool.drain_timeout_s + SHUTDOWN_MARGIN_S


def _pod_template(cluster: str, spec: ClusterSpec, pool: Pool, config_hash: str) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "serviceAccountName": cluster,
        "automountServiceAccountToken": False,  # no component calls the Kubernetes API
        "terminationGracePeriodSeconds": termination_grace_s(pool),
        "containers": [_main_container(cluster, spec, pool)],
        "volumes": _volumes(spec, pool),
    }
    if spec.model.demo:
        pod["initContainers"] = [_demo_model_container(spec)]
    if pool.node_selector:
        pod["nodeSelector"] = dict(pool.node_selector)
    if pool.gpus:  # GPU nodes are commonly tainted so that only pods asking for GPUs land there
        pod["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    return {
        # The hash rolls the pods when the shared ConfigMap changes (env from a ConfigMap is read at start only).
        "metadata": {
            "labels": selector_labels(cluster, pool.role),
            "annotations": {CONFIG_HASH: config_hash},
        },
        "spec": pod,
    }


def _main_container(cluster: str, spec: ClusterSpec, pool: Pool) -> dict[str, Any]:
    is_router = pool.role == "router"
    container: dict[str, Any] = {
        "name": pool.role,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["splitserve"],
        "args": (_router_args if is_router else _node_args)(spec, pool),
        "envFrom": [{"configMapRef": {"name": object_name(cluster, "config")}}],
        "env": _env(cluster, spec, pool),
        "ports": [
            {"name": "grpc", "containerPort": GRPC_PORT},
            {"name": "http" if is_router else "metrics", "containerPort": HTTP_PORT},
        ],
        "volumeMounts": _volume_mounts(spec, pool),
        "securityContext": {"allowPrivilegeEscalation": False},
        **(_router_probes() if is_router else _node_probes()),
    }
    if pool.pre_stop_sleep_s:
        container["lifecycle"] = {"preStop": {"exec": {"command": ["sleep", str(pool.pre_stop_sleep_s)]}}}
    _set_resources(container, pool.resources, pool.gpus)
    return container


def _router_args(spec: ClusterSpec, pool: Pool) -> list[str]:
    args = ["router", "--model", spec.model.directory]  # the Redis URL comes from $SPLITSERVE_REDIS_URL
    args += ["--host", "0.0.0.0", "--grpc-port", str(GRPC_PORT), "--http-port", str(HTTP_PORT)]
    args += ["--policy", spec.placement.policy]
    for key, value in spec.placement.options.items():
        args += ["--policy-option", f"{key}={value}"]
    return [*args, *pool.extra_args]


def _node_args(spec: ClusterSpec, pool: Pool) -> list[str]:
    # A node registers --host:--port in Redis for routers and peers to dial: it must be the pod's own IP.
    args = [pool.role, "--model", spec.model.directory]  # the Redis URL comes from $SPLITSERVE_REDIS_URL
    args += ["--host", "$(POD_IP)", "--port", str(GRPC_PORT), "--metrics-port", str(HTTP_PORT)]
    # A colocated node makes no KV transport, but takes --kv-backend anyway: a node that the pool control moves to
    # prefill or decode comes back with these same flags and must then speak the cluster's backend.
    args += ["--kv-backend", spec.kv_transfer.backend, "--machine-type", pool.machine_type]
    args += ["--drain-timeout", str(pool.drain_timeout_s), "--dtype", pool.dtype]
    if pool.gpus:
        args += ["--device", "cuda"]
    if pool.threads is not None:
        args += ["--threads", str(pool.threads)]
    if pool.kv_cache_mb is not None:
        args += ["--kv-cache-mb", str(pool.kv_cache_mb)]
    if pool.tensor_parallel_size > 1:
        args += ["--tensor-parallel", str(pool.tensor_parallel_size)]
    if spec.machine_catalog is not None:
        args += ["--machines", f"{CATALOG_DIR}/{spec.machine_catalog.key}"]
    if pool.role == "prefill" and spec.kv_transfer.one_piece_below is not None:
        args += ["--one-piece-below", str(spec.kv_transfer.one_piece_below)]
    return [*args, *pool.extra_args]


def _env(cluster: str, spec: ClusterSpec, pool: Pool) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = []
    if pool.role != "router":
        env.append({"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
    token = cluster_token_ref(cluster, spec)
    env.append({"name": "SPLITSERVE_CLUSTER_TOKEN", "valueFrom": _secret_key(token.name, token.key)})
    external = spec.redis.external_url
    if external is None:
        password = redis_password_ref(cluster)
        # Defined before the URL: the kubelet expands $(VAR) only from variables listed earlier.
        env.append(
            {"name": "SPLITSERVE_REDIS_PASSWORD", "valueFrom": _secret_key(password.name, password.key)}
        )
        url = f"redis://:$(SPLITSERVE_REDIS_PASSWORD)@{object_name(cluster, 'redis')}:{REDIS_PORT}/0"
        env.append({"name": "SPLITSERVE_REDIS_URL", "value": url})
    else:
        env.append({"name": "SPLITSERVE_REDIS_URL", "valueFrom": _secret_key(external.name, external.key)})
    if pool.role == "router" and spec.api_key is not None:
        env.append(
            {"name": "SPLITSERVE_API_KEY", "valueFrom": _secret_key(spec.api_key.name, spec.api_key.key)}
        )
    env += [{"name": name, "value": value} for name, value in pool.env.items()]
    return env


def _secret_key(name: str, key: str) -> dict[str, Any]:
    return {"secretKeyRef": {"name": name, "key": key}}


def _router_probes() -> dict[str, Any]:
    return {
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": HTTP_PORT}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": HTTP_PORT}, "periodSeconds": 10},
        "startupProbe": {
            "httpGet": {"path": "/healthz", "port": HTTP_PORT},
            "periodSeconds": 5,
            "failureThreshold": 60,
        },
    }


def _node_probes() -> dict[str, Any]:
    # Readiness follows the node's gRPC health, which turns NOT_SERVING while it drains; liveness only asks whether
    # the process still listens, so a draining node is never restarted.
    return {
        "readinessProbe": {"grpc": {"port": GRPC_PORT}, "periodSeconds": 5},
        "livenessProbe": {"tcpSocket": {"port": GRPC_PORT}, "periodSeconds": 10},
        # Loading a large model takes minutes: up to 20 before liveness starts counting.
        "startupProbe": {"tcpSocket": {"port": GRPC_PORT}, "periodSeconds": 10, "failureThreshold": 120},
    }


def _set_resources(container: dict[str, Any], resources: Resources, gpus: int) -> None:
    requests = dict(resources.requests)
    limits = dict(resources.limits)
    if gpus:
        limits[GPU_RESOURCE] = str(gpus)
    quantities = {key: value for key, value in (("requests", requests), ("limits", limits)) if value}
    if quantities:
        container["resources"] = quantities


def _volumes(spec: ClusterSpec, pool: Pool) -> list[dict[str, Any]]:
    model = spec.model
    if model.pvc_claim is not None:
        source: dict[str, Any] = {"persistentVolumeClaim": {"claimName": model.pvc_claim, "readOnly": True}}
    elif model.host_path is not None:
        source = {"hostPath": {"path": model.host_path, "type": "Directory"}}
    else:
        source = {"emptyDir": {}}
    volumes = [{"name": MODEL_VOLUME, **source}]
    if spec.machine_catalog is not None and pool.role != "router":
        volumes.append({"name": CATALOG_VOLUME, "configMap": {"name": spec.machine_catalog.name}})
    return volumes


def _volume_mounts(spec: ClusterSpec, pool: Pool) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [
        {"name": MODEL_VOLUME, "mountPath": spec.model.mount_path, "readOnly": not spec.model.demo}
    ]
    if spec.machine_catalog is not None and pool.role != "router":
        mounts.append({"name": CATALOG_VOLUME, "mountPath": CATALOG_DIR, "readOnly": True})
    return mounts


def _demo_model_container(spec: ClusterSpec) -> dict[str, Any]:
    return {
        "name": "demo-model",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["splitserve"],
        "args": ["make-tiny-model", spec.model.directory, *DEMO_MODEL_ARGS],
        "volumeMounts": [{"name": MODEL_VOLUME, "mountPath": spec.model.mount_path}],
        "securityContext": {"allowPrivilegeEscalation": False},
    }
