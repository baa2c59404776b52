"""A SplitserveCluster's spec, parsed and checked into frozen dataclasses with every default filled in.

The API server already enforces the CRD's schema and CEL rules (ops/operator/crd.py), but a spec can also come from
a file (`splitserve operator --render`) or from an older CRD, so everything render() relies on is checked again
here. A spec that cannot be rendered raises SpecError with one line naming the field, e.g.
`spec.prefill: set replicas or autoscaling, not both`; the operator shows that line in the Degraded condition.

The defaults live here (DEFAULTS) and crd.py copies them into the schema, so the two cannot drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from cluster.machines import BUILTIN_MACHINES
from ops.operator.fields import Fields, SpecError

KV_BACKENDS = ("nixl", "torch")
NODE_POOLS = ("prefill", "decode")  # the split pools every cluster has
# Optional: nodes that run whole requests (the router's fallback when no prefill/decode pair is free, and the
# baseline to compare against); with no pods it gets no objects at all.
COLOCATED = "colocated"
POOLS = ("router", *NODE_POOLS, COLOCATED)
PULL_POLICIES = ("Always", "IfNotPresent", "Never")

DEFAULTS: dict[str, Any] = {
    # `make image` tags the image with the package version, so the default follows each release.
    "image": f"splitserve:{metadata.version('splitserve')}",
    "imagePullPolicy": "IfNotPresent",
    "model.mountPath": "/models",
    "pool.replicas": 1,
    "colocated.replicas": 0,
    "pool.machineType": "cpu",
    "pool.gpus": 0,
    "pool.tensorParallelSize": 1,
    "pool.dtype": "auto",
    "pool.drainTimeoutSeconds": 30,
    # Long enough for kube-proxy and the routers' Redis view (2 s lease + resync) to stop sending new work.
    "pool.preStopSleepSeconds": 5,
    "autoscaling.minReplicas": 1,
    "autoscaling.targetCPUUtilizationPercent": 80,
    "router.policy": "jsq",
    "kvTransfer.backend": "nixl",
    "redis.image": "redis:7.2-alpine",
    "secret.apiKeyKey": "api-key",
    "secret.redisUrlKey": "url",
    "secret.clusterTokenKey": "token",
    "machineCatalog.key": "machines.json",
}

ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# Object names are NAME-<component>, and Service names must stay DNS labels (63). Every cluster has NAME-prefill;
# NAME-colocated is longer, so a cluster that runs a colocated pool needs a shorter name.
MAX_DNS_LABEL = 63
MAX_CLUSTER_NAME = MAX_DNS_LABEL - len("-prefill")
MAX_COLOCATED_CLUSTER_NAME = MAX_DNS_LABEL - len(f"-{COLOCATED}")


@dataclass(frozen=True, slots=True)
class PodsMetric:
    """A per-pod custom metric (served by a metrics adapter) the HPA keeps at average_value."""

    name: str
    average_value: str


@dataclass(frozen=True, slots=True)
class Autoscaling:
    min_replicas: int
    max_replicas: int
    target_cpu_percent: int | None  # None when pods_metric drives the HPA
    pods_metric: PodsMetric | None


@dataclass(frozen=True, slots=True)
class Resources:
    requests: dict[str, str] = field(default_factory=dict)
    limits: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Pool:
    """One Deployment's worth of router, prefill, decode or colocated processes."""

    role: str  # router | prefill | decode | colocated
    replicas: int | None  # None: the HPA owns the count (autoscaling is set)
    autoscaling: Autoscaling | None
    resources: Resources
    gpus: int  # nvidia.com/gpu per pod; > 0 runs the engine on CUDA
    machine_type: str  # the nodes' --machine-type (price and power model)
    tensor_parallel_size: int
    dtype: str
    threads: int | None
    kv_cache_mb: int | None
    drain_timeout_s: int  # the nodes' --drain-timeout
    pre_stop_sleep_s: int
    env: dict[str, str]
    extra_args: tuple[str, ...]
    node_selector: dict[str, str]


@dataclass(frozen=True, slots=True)
class Placement:
    policy: str
    options: dict[str, str]  # --policy-option KEY=VALUE


@dataclass(frozen=True, slots=True)
class Model:
    """The model directory every pod mounts at mount_path/name (the router serves it under `name`)."""

    name: str
    mount_path: str
    pvc_claim: str | None
    host_path: str | None
    demo: bool  # a tiny random model written by an init container: no volume needed

    @property
    def directory(self) -> str:
        return f"{self.mount_path.rstrip('/')}/{self.name}"


@dataclass(frozen=True, slots=True)
class SecretRef:
    name: str
    key: str


@dataclass(frozen=True, slots=True)
class KVTransfer:
    backend: str
    ucx_transports: str | None  # UCX_TLS for nixl, e.g. "tcp,self" where pods have no RDMA
    one_piece_below: int | None  # prefill's --one-piece-below


@dataclass(frozen=True, slots=True)
class Redis:
    external_url: SecretRef | None  # None: a managed Redis Deployment
    image: str
    resources: Resources


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    image: str
    image_pull_policy: str
    model: Model
    router: Pool
    prefill: Pool
    decode: Pool
    colocated: Pool  # replicas 0 (the default): not rendered
    placement: Placement
    kv_transfer: KVTransfer
    redis: Redis
    api_key: SecretRef | None
    # The user's own Secret holding the cluster token; None: the operator generates NAME-cluster-token.
    cluster_token: SecretRef | None
    machine_catalog: SecretRef | None  # a ConfigMap (name, key) holding a JSON machine catalog
    otlp_endpoint: str | None

    def pools(self) -> tuple[Pool, ...]:
        """The pools render() makes objects for: the colocated one only when it has, or may scale to, pods."""
        colocated = (self.colocated,) if self.colocated.replicas != 0 else ()
        return (self.router, self.prefill, self.decode, *colocated)


def parse_spec(raw: Mapping[str, Any]) -> ClusterSpec:
    """The checked spec of a SplitserveCluster (`.spec` of the object); SpecError for anything render() cannot use."""
    spec = Fields(raw, "spec")
    spec.allow(
        "image",
        "imagePullPolicy",
        "model",
        "router",
        "prefill",
        "decode",
        COLOCATED,
        "kvTransfer",
        "redis",
        "apiKeySecret",
        "clusterTokenSecret",
        "machineCatalog",
        "otlpEndpoint",
    )
    pull_policy = spec.text("imagePullPolicy", DEFAULTS["imagePullPolicy"])
    if pull_policy not in PULL_POLICIES:
        spec.fail("imagePullPolicy", f"must be one of {', '.join(PULL_POLICIES)}, got {pull_policy!r}")
    machine_catalog = _secret_ref(spec, "machineCatalog", "configMapName", DEFAULTS["machineCatalog.key"])
    router_fields = spec.child("router")
    pools = {
        role: _pool(spec.child(role), role, custom_machines=machine_catalog is not None) for role in POOLS
    }
    return ClusterSpec(
        image=spec.text("image", DEFAULTS["image"]),
        image_pull_policy=pull_policy,
        model=_model(spec.child("model", required=True)),
        router=pools["router"],
        prefill=pools["prefill"],
        decode=pools["decode"],
        colocated=pools[COLOCATED],
        placement=Placement(
            policy=router_fields.text("policy", DEFAULTS["router.policy"]),
            options=router_fields.string_map("policyOptions"),
        ),
        kv_transfer=_kv_transfer(spec.child("kvTransfer")),
        redis=_redis(spec.child("redis")),
        api_key=_secret_ref(spec, "apiKeySecret", "name", DEFAULTS["secret.apiKeyKey"]),
        cluster_token=_secret_ref(spec, "clusterTokenSecret", "name", DEFAULTS["secret.clusterTokenKey"]),
        machine_catalog=machine_catalog,
        otlp_endpoint=spec.optional_text("otlpEndpoint"),
    )


def check_cluster_name(name: str, *, colocated: bool = False) -> None:
    """Object names derive from the cluster's name: it must be a DNS label short enough for NAME-prefill, and for
    NAME-colocated when that pool is rendered."""
    limit = MAX_COLOCATED_CLUSTER_NAME if colocated else MAX_CLUSTER_NAME
    if not DNS_LABEL.match(name) or len(name) > limit:
        why = " with a colocated pool" if colocated else ""
        raise SpecError(
            f"metadata.name: must be a DNS label (lower-case letters, digits, '-') of at most "
            f"{limit} characters{why}, got {name!r}"
        )


def _pool(fields: Fields, role: str, *, custom_machines: bool) -> Pool:
    common = ("replicas", "autoscaling", "resources", "env", "extraArgs", "nodeSelector")
    router_only = ("policy", "policyOptions")
    node_only = (
        "machineType",
        "gpus",
        "tensorParallelSize",
        "dtype",
        "threads",
        "kvCacheMB",
        "drainTimeoutSeconds",
    )
    fields.allow(*common, "preStopSleepSeconds", *(router_only if role == "router" else node_only))
    autoscaling = _autoscaling(fields.child("autoscaling")) if "autoscaling" in fields.raw else None
    if autoscaling is not None and "replicas" in fields.raw:
        fields.fail(None, "set replicas or autoscaling, not both")
    default_replicas = DEFAULTS["colocated.replicas" if role == COLOCATED else "pool.replicas"]
    replicas = None if autoscaling else fields.integer("replicas", default_replicas, minimum=0)
    resources = _resources(fields.child("resources"))
    if autoscaling and autoscaling.target_cpu_percent is not None and "cpu" not in resources.requests:
        fields.fail("autoscaling", "a CPU utilization target needs resources.requests.cpu")
    machine_type = fields.text("machineType", DEFAULTS["pool.machineType"])
    if not custom_machines and machine_type not in BUILTIN_MACHINES:
        known = ", ".join(sorted(BUILTIN_MACHINES))
        fields.fail(
            "machineType", f"unknown machine type {machine_type!r} (known: {known}; or set machineCatalog)"
        )
    gpus = fields.integer("gpus", DEFAULTS["pool.gpus"], minimum=0)
    tensor_parallel = fields.integer("tensorParallelSize", DEFAULTS["pool.tensorParallelSize"], minimum=1)
    for quantity_map in (resources.requests, resources.limits):
        if "nvidia.com/gpu" in quantity_map:
            fields.fail("resources", "set GPUs with the pool's gpus field, not nvidia.com/gpu")
    return Pool(
        role=role,
        replicas=replicas,
        autoscaling=autoscaling,
        resources=resources,
        gpus=gpus,
        machine_type=machine_type,
        tensor_parallel_size=tensor_parallel,
        dtype=fields.text("dtype", DEFAULTS["pool.dtype"]),
        threads=fields.optional_integer("threads", minimum=1),
        kv_cache_mb=fields.optional_integer("kvCacheMB", minimum=1),
        drain_timeout_s=fields.integer(
            "drainTimeoutSeconds", DEFAULTS["pool.drainTimeoutSeconds"], minimum=0
        ),
        pre_stop_sleep_s=fields.integer(
            "preStopSleepSeconds", DEFAULTS["pool.preStopSleepSeconds"], minimum=0
        ),
        env=_env(fields),
        extra_args=tuple(fields.string_list("extraArgs")),
        node_selector=fields.string_map("nodeSelector"),
    )


def _autoscaling(fields: Fields) -> Autoscaling:
    fields.allow("minReplicas", "maxReplicas", "targetCPUUtilizationPercent", "podsMetric")
    minimum = fields.integer("minReplicas", DEFAULTS["autoscaling.minReplicas"], minimum=1)
    maximum = fields.integer("maxReplicas", None, minimum=1)
    if minimum > maximum:
        fields.fail(None, f"minReplicas {minimum} is greater than maxReplicas {maximum}")
    pods_metric = None
    if "podsMetric" in fields.raw:
        if "targetCPUUtilizationPercent" in fields.raw:
            fields.fail(None, "set targetCPUUtilizationPercent or podsMetric, not both")
        metric = fields.child("podsMetric")
        metric.allow("name", "averageValue")
        pods_metric = PodsMetric(metric.text("name", None), metric.quantity("averageValue"))
    target = None
    if pods_metric is None:
        default_target = DEFAULTS["autoscaling.targetCPUUtilizationPercent"]
        target = fields.integer("targetCPUUtilizationPercent", default_target, minimum=1)
    return Autoscaling(minimum, maximum, target, pods_metric)


def _resources(fields: Fields) -> Resources:
    fields.allow("requests", "limits")
    return Resources(fields.quantity_map("requests"), fields.quantity_map("limits"))


def _env(fields: Fields) -> dict[str, str]:
    env = fields.string_map("env")
    for name in env:
        if not ENV_NAME.match(name):
            fields.fail("env", f"{name!r} is not a valid environment variable name")
    return env


def _model(fields: Fields) -> Model:
    fields.allow("name", "mountPath", "pvcName", "hostPath", "demo")
    name = fields.text("name", None)
    if "/" in name or name in (".", ".."):
        fields.fail("name", f"must be a directory name (the router serves the model under it), got {name!r}")
    mount_path = fields.text("mountPath", DEFAULTS["model.mountPath"])
    if not mount_path.startswith("/"):
        fields.fail("mountPath", f"must be an absolute path, got {mount_path!r}")
    model = Model(
        name=name,
        mount_path=mount_path,
        pvc_claim=fields.optional_text("pvcName"),
        host_path=fields.optional_text("hostPath"),
        demo=fields.boolean("demo", False),
    )
    sources = [model.pvc_claim is not None, model.host_path is not None, model.demo]
    if sum(sources) != 1:
        fields.fail(None, "set exactly one of pvcName, hostPath or demo: true")
    return model


def _kv_transfer(fields: Fields) -> KVTransfer:
    fields.allow("backend", "ucxTransports", "onePieceBelowTokens")
    backend = fields.text("backend", DEFAULTS["kvTransfer.backend"])
    if backend not in KV_BACKENDS:
        fields.fail("backend", f"unknown KV transfer backend {backend!r} (known: {', '.join(KV_BACKENDS)})")
    ucx = fields.optional_text("ucxTransports")
    if ucx is not None and backend != "nixl":
        fields.fail("ucxTransports", "applies to the nixl backend only")
    return KVTransfer(backend, ucx, fields.optional_integer("onePieceBelowTokens", minimum=0))


def _redis(fields: Fields) -> Redis:
    fields.allow("managed", "external")
    if "managed" in fields.raw and "external" in fields.raw:
        fields.fail(None, "set managed or external, not both")
    external = _secret_ref(fields, "external", "secretName", DEFAULTS["secret.redisUrlKey"])
    managed = fields.child("managed")
    managed.allow("image", "resources")
    return Redis(
        external, managed.text("image", DEFAULTS["redis.image"]), _resources(managed.child("resources"))
    )


def _secret_ref(parent: Fields, key: str, name_field: str, default_key: str) -> SecretRef | None:
    if key not in parent.raw:
        return None
    fields = parent.child(key)
    fields.allow(name_field, "key")
    return SecretRef(fields.text(name_field, None), fields.text("key", default_key))
