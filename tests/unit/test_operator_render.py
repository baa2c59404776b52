"""render(): the objects a SplitserveCluster becomes, for representative specs; and status from Deployments."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from ops.operator.labels import Owner, selector_labels
from ops.operator.render import render
from ops.operator.spec import DEFAULTS, SpecError
from ops.operator.status import PoolState, cluster_status

CPU_DEMO: dict[str, Any] = {
    "model": {"name": "demo-model", "demo": True},
    "kvTransfer": {"ucxTransports": "tcp,self"},
}
GPU: dict[str, Any] = {
    "model": {"name": "Llama-3.1-8B-Instruct", "pvcName": "models"},
    "prefill": {"replicas": 2, "machineType": "dgx-h100", "gpus": 1, "dtype": "bfloat16"},
    "decode": {
        "autoscaling": {
            "minReplicas": 2,
            "maxReplicas": 8,
            "podsMetric": {"name": "running", "averageValue": 24},
        },
        "machineType": "dgx-h100-cap",
        "gpus": 2,
        "drainTimeoutSeconds": 120,
    },
    "router": {"replicas": 3, "policy": "cost", "policyOptions": {"ttft": "2"}},
    "redis": {"external": {"secretName": "redis-url", "key": "address"}},
    "apiKeySecret": {"name": "api"},
}
OWNER = Owner("splitserve.io/v1alpha1", "SplitserveCluster", "llm", "0f7c6a50-uid")


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(deployment: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(deployment)["env"]}


def flag(args: list[str], name: str) -> str:
    assert args.count(name) == 1, f"{name} given {args.count(name)} times in {args}"
    return args[args.index(name) + 1]


def test_cpu_demo_runs_three_fixed_pools_with_a_managed_redis() -> None:
    objects = render("demo", "ns", CPU_DEMO)
    deployments = by_kind(objects, "Deployment")
    services = by_kind(objects, "Service")

    assert sorted(deployments) == ["demo-decode", "demo-prefill", "demo-redis", "demo-router"]
    assert all(
        deployments[f"demo-{pool}"]["spec"]["replicas"] == 1 for pool in ("router", "prefill", "decode")
    )
    assert by_kind(objects, "HorizontalPodAutoscaler") == {}
    assert sorted(by_kind(objects, "PodDisruptionBudget")) == ["demo-decode", "demo-prefill", "demo-router"]
    assert {o["metadata"]["namespace"] for o in objects} == {"ns"}
    # Every pod reaches the managed Redis through its Service.
    assert services["demo-redis"]["spec"]["ports"][0]["port"] == 6379
    for name in ("demo-router", "demo-prefill", "demo-decode"):
        url = "redis://:$(SPLITSERVE_REDIS_PASSWORD)@demo-redis:6379/0"
        assert env_of(deployments[name])["SPLITSERVE_REDIS_URL"] == url
        # The CLI reads the URL (with its password) from the environment: none in argv.
        assert "--redis-url" not in container(deployments[name])["args"]
    assert by_kind(objects, "ConfigMap")["demo-config"]["data"]["UCX_TLS"] == "tcp,self"


def test_the_router_service_exposes_grpc_and_http_and_node_services_are_headless() -> None:
    services = by_kind(render("demo", "ns", CPU_DEMO), "Service")

    router = services["demo-router"]["spec"]
    assert {p["name"]: p["port"] for p in router["ports"]} == {"grpc": 50051, "http": 8000}
    assert "clusterIP" not in router
    for pool in ("prefill", "decode"):
        spec = services[f"demo-{pool}"]["spec"]
        assert spec["clusterIP"] == "None"
        assert spec["selector"] == selector_labels("demo", pool)


def test_nodes_advertise_their_pod_ip_and_the_router_listens_on_all_interfaces() -> None:
    deployments = by_kind(render("demo", "ns", CPU_DEMO), "Deployment")

    router_args = container(deployments["demo-router"])["args"]
    assert router_args[0] == "router"
    assert flag(router_args, "--host") == "0.0.0.0"
    assert flag(router_args, "--model") == "/models/demo-model"
    for pool in ("prefill", "decode"):
        node = deployments[f"demo-{pool}"]
        args = container(node)["args"]
        assert args[0] == pool
        assert flag(args, "--host") == "$(POD_IP)"
        assert env_of(node)["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        assert flag(args, "--kv-backend") == "nixl"
        assert flag(args, "--machine-type") == "cpu"
        assert "--device" not in args


def test_pods_drain_within_their_grace_period() -> None:
    spec = copy.deepcopy(CPU_DEMO)
    spec["decode"] = {"drainTimeoutSeconds": 90, "preStopSleepSeconds": 7}
    deployments = by_kind(render("demo", "ns", spec), "Deployment")

    decode = deployments["demo-decode"]["spec"]["template"]["spec"]
    assert flag(container(deployments["demo-decode"])["args"], "--drain-timeout") == "90"
    assert container(deployments["demo-decode"])["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "7"]
    assert decode["terminationGracePeriodSeconds"] > 90 + 7
    prefill = deployments["demo-prefill"]["spec"]["template"]["spec"]
    assert prefill["terminationGracePeriodSeconds"] > DEFAULTS["pool.drainTimeoutSeconds"]
    # A rollout starts the new pod before draining an old one.
    strategy = deployments["demo-decode"]["spec"]["strategy"]["rollingUpdate"]
    assert strategy == {"maxSurge": 1, "maxUnavailable": 0}


def test_the_demo_model_is_made_per_pod_and_a_pvc_model_is_mounted_read_only() -> None:
    demo = by_kind(render("demo", "ns", CPU_DEMO), "Deployment")["demo-prefill"]["spec"]["template"]["spec"]
    assert demo["volumes"] == [{"name": "model", "emptyDir": {}}]
    init = demo["initContainers"][0]
    assert init["args"][:2] == ["make-tiny-model", "/models/demo-model"]

    gpu = by_kind(render("llm", "ns", GPU), "Deployment")["llm-decode"]["spec"]["template"]["spec"]
    assert "initContainers" not in gpu
    assert gpu["volumes"] == [
        {"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}
    ]
    assert gpu["containers"][0]["volumeMounts"] == [
        {"name": "model", "mountPath": "/models", "readOnly": True}
    ]


def test_gpu_pools_ask_for_gpus_run_on_cuda_and_tolerate_the_gpu_taint() -> None:
    deployments = by_kind(render("llm", "ns", GPU), "Deployment")

    for pool, gpus, machine in (("prefill", "1", "dgx-h100"), ("decode", "2", "dgx-h100-cap")):
        pod = deployments[f"llm-{pool}"]["spec"]["template"]["spec"]
        main = pod["containers"][0]
        assert main["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert flag(main["args"], "--device") == "cuda"
        assert flag(main["args"], "--machine-type") == machine
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert flag(container(deployments["llm-prefill"])["args"], "--dtype") == "bfloat16"
    router = container(deployments["llm-router"])
    assert (
        "resources" not in router
        and "tolerations" not in deployments["llm-router"]["spec"]["template"]["spec"]
    )


def test_autoscaling_renders_an_hpa_and_leaves_the_deployment_replicas_unset() -> None:
    objects = render("llm", "ns", GPU)
    deployments = by_kind(objects, "Deployment")
    autoscalers = by_kind(objects, "HorizontalPodAutoscaler")

    assert "replicas" not in deployments["llm-decode"]["spec"]
    assert deployments["llm-prefill"]["spec"]["replicas"] == 2
    assert deployments["llm-router"]["spec"]["replicas"] == 3
    assert sorted(autoscalers) == ["llm-decode"]
    hpa = autoscalers["llm-decode"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "llm-decode",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    assert hpa["spec"]["metrics"] == [
        {
            "type": "Pods",
            "pods": {"metric": {"name": "running"}, "target": {"type": "AverageValue", "averageValue": "24"}},
        }
    ]


def test_a_cpu_target_autoscaler_uses_resource_utilization() -> None:
    spec = copy.deepcopy(CPU_DEMO)
    spec["prefill"] = {
        "autoscaling": {"maxReplicas": 4, "targetCPUUtilizationPercent": 60},
        "resources": {"requests": {"cpu": "2"}},
    }
    hpa = by_kind(render("demo", "ns", spec), "HorizontalPodAutoscaler")["demo-prefill"]

    assert hpa["spec"]["minReplicas"] == DEFAULTS["autoscaling.minReplicas"]
    metric = hpa["spec"]["metrics"][0]
    assert metric["resource"] == {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 60}}


def test_external_redis_comes_from_a_secret_and_no_redis_is_managed() -> None:
    objects = render("llm", "ns", GPU)

    assert "llm-redis" not in by_kind(objects, "Deployment")
    assert "llm-redis" not in by_kind(objects, "Service")
    url = {"secretKeyRef": {"name": "redis-url", "key": "address"}}
    for deployment in by_kind(objects, "Deployment").values():
        assert env_of(deployment)["SPLITSERVE_REDIS_URL"] == url


def test_the_api_key_reaches_the_router_only_and_placement_flags_pass_through() -> None:
    deployments = by_kind(render("llm", "ns", GPU), "Deployment")

    assert env_of(deployments["llm-router"])["SPLITSERVE_API_KEY"] == {
        "secretKeyRef": {"name": "api", "key": "api-key"}
    }
    assert "SPLITSERVE_API_KEY" not in env_of(deployments["llm-prefill"])
    args = container(deployments["llm-router"])["args"]
    assert flag(args, "--policy") == "cost"
    assert flag(args, "--policy-option") == "ttft=2"


def test_owner_references_and_labels_mark_every_object() -> None:
    owned = render("llm", "ns", GPU, owner=OWNER)
    unowned = render("llm", "ns", GPU)

    for body in owned:
        (reference,) = body["metadata"]["ownerReferences"]
        assert reference["uid"] == OWNER.uid and reference["controller"] is True
        labels = body["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "llm"
        assert labels["app.kubernetes.io/managed-by"] == "splitserve-operator"
    assert all("ownerReferences" not in body["metadata"] for body in unowned)
    for deployment in by_kind(owned, "Deployment").values():
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_a_configmap_change_rolls_the_pods() -> None:
    before = by_kind(render("demo", "ns", CPU_DEMO), "Deployment")["demo-decode"]
    changed = copy.deepcopy(CPU_DEMO)
    changed["otlpEndpoint"] = "http://collector:4317"
    after = by_kind(render("demo", "ns", changed), "Deployment")["demo-decode"]

    def config_hash(d: dict[str, Any]) -> str:
        return str(d["spec"]["template"]["metadata"]["annotations"]["splitserve.io/config-hash"])

    assert config_hash(before) != config_hash(after)


def test_render_is_pure() -> None:
    raw = copy.deepcopy(GPU)

    assert render("llm", "ns", raw, owner=OWNER) == render("llm", "ns", raw, owner=OWNER)
    assert raw == GPU


def test_render_refuses_a_name_too_long_for_its_objects() -> None:
    with pytest.raises(SpecError, match=r"^metadata\.name"):
        render("x" * 60, "ns", CPU_DEMO)
    with_colocated = CPU_DEMO | {"colocated": {"replicas": 1}}
    render("x" * 55, "ns", CPU_DEMO)
    with pytest.raises(SpecError, match=r"^metadata\.name: .* with a colocated pool"):
        render("x" * 55, "ns", with_colocated)


# -- the optional colocated pool ---------------------------------------------------------------------------------


def colocated_objects(objects: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [
        (o["kind"], o["metadata"]["name"])
        for o in objects
        if o["metadata"]["labels"]["app.kubernetes.io/component"] == "colocated"
    ]


def test_without_pods_the_colocated_pool_makes_no_objects() -> None:
    absent = render("demo", "ns", CPU_DEMO)

    assert colocated_objects(absent) == []
    assert not [o for o in absent if "colocated" in o["metadata"]["name"]]
    assert render("demo", "ns", CPU_DEMO | {"colocated": {"replicas": 0, "gpus": 1}}) == absent


def test_a_colocated_pool_runs_whole_request_nodes_like_the_other_node_pools() -> None:
    spec = CPU_DEMO | {"colocated": {"replicas": 2, "machineType": "dgx-a100", "gpus": 1, "threads": 4}}
    objects = render("demo", "ns", spec)
    deployment = by_kind(objects, "Deployment")["demo-colocated"]
    main = container(deployment)
    args = main["args"]

    assert sorted(colocated_objects(objects)) == [
        ("Deployment", "demo-colocated"),
        ("PodDisruptionBudget", "demo-colocated"),
        ("Service", "demo-colocated"),
    ]
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["selector"]["matchLabels"] == selector_labels("demo", "colocated")
    assert (main["name"], main["command"], args[0]) == ("colocated", ["splitserve"], "colocated")
    assert flag(args, "--host") == "$(POD_IP)"
    assert env_of(deployment)["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert (flag(args, "--machine-type"), flag(args, "--device"), flag(args, "--threads")) == (
        "dgx-a100",
        "cuda",
        "4",
    )
    # No transport of its own, but the cluster's backend in case the pool control moves it to prefill/decode.
    assert flag(args, "--kv-backend") == "nixl"
    assert (
        env_of(deployment)["SPLITSERVE_REDIS_URL"]
        == "redis://:$(SPLITSERVE_REDIS_PASSWORD)@demo-redis:6379/0"
    )
    assert main["resources"]["limits"]["nvidia.com/gpu"] == "1"
    service = by_kind(objects, "Service")["demo-colocated"]["spec"]
    assert service["clusterIP"] == "None" and service["selector"] == selector_labels("demo", "colocated")
    budget = by_kind(objects, "PodDisruptionBudget")["demo-colocated"]["spec"]
    assert budget["selector"]["matchLabels"] == selector_labels("demo", "colocated")
    # The other pools render exactly as without it.
    assert [o for o in objects if "colocated" not in o["metadata"]["name"]] == render("demo", "ns", CPU_DEMO)


def test_each_pool_splits_its_nodes_over_its_own_tensor_parallel_ranks() -> None:
    split = render("demo", "ns", CPU_DEMO | {"colocated": {"replicas": 1, "tensorParallelSize": 2}})
    args = container(by_kind(split, "Deployment")["demo-colocated"])["args"]
    assert flag(args, "--tensor-parallel") == "2"
    mixed = render(
        "demo", "ns", CPU_DEMO | {"prefill": {"tensorParallelSize": 2}, "decode": {"tensorParallelSize": 4}}
    )
    deployments = by_kind(mixed, "Deployment")
    assert flag(container(deployments["demo-prefill"])["args"], "--tensor-parallel") == "2"
    assert flag(container(deployments["demo-decode"])["args"], "--tensor-parallel") == "4"
    whole = render("demo", "ns", CPU_DEMO | {"colocated": {"replicas": 1}})
    assert "--tensor-parallel" not in container(by_kind(whole, "Deployment")["demo-colocated"])["args"]


def test_an_autoscaled_colocated_pool_gets_an_hpa_and_no_fixed_replicas() -> None:
    spec = CPU_DEMO | {
        "colocated": {
            "autoscaling": {"minReplicas": 2, "maxReplicas": 5},
            "resources": {"requests": {"cpu": 2}},
        }
    }
    objects = render("demo", "ns", spec)

    assert "replicas" not in by_kind(objects, "Deployment")["demo-colocated"]["spec"]
    hpa = by_kind(objects, "HorizontalPodAutoscaler")["demo-colocated"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "demo-colocated"
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 5)


# -- status ----------------------------------------------------------------------------------------------------


def deployment_status(desired: int, ready: int, updated: int, **extra: Any) -> dict[str, Any]:
    return {
        "metadata": {"generation": 3},
        "spec": {"replicas": desired},
        "status": {
            "observedGeneration": 3,
            "readyReplicas": ready,
            "updatedReplicas": updated,
            "replicas": desired,
        }
        | extra,
    }


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_status_is_ready_when_every_pool_is() -> None:
    pools = {role: PoolState.of(deployment_status(2, 2, 2)) for role in ("router", "prefill", "decode")}
    status = cluster_status(7, pools, [], "2026-11-22T10:00:00Z")

    assert status["observedGeneration"] == 7
    assert conditions(status) == {
        "Ready": ("True", "AllPoolsReady"),
        "Progressing": ("False", "Stable"),
        "Degraded": ("False", "AsExpected"),
    }
    assert status["pools"]["decode"] == {"replicas": 2, "readyReplicas": 2, "updatedReplicas": 2}


def test_status_reports_a_rollout_and_a_missing_pool() -> None:
    pools = {
        "router": PoolState.of(deployment_status(1, 1, 1)),
        "prefill": PoolState.of(deployment_status(3, 1, 2)),
        "decode": PoolState.of(None),
    }
    status = cluster_status(2, pools, [], "2026-11-22T10:00:00Z")
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")

    assert conditions(status)["Progressing"] == ("True", "RollingOut")
    assert ready["message"] == "prefill: 1/3 ready, 2 updated, decode: not created yet"


def test_a_stalled_rollout_is_degraded() -> None:
    stalled = deployment_status(
        2,
        1,
        1,
        conditions=[
            {
                "type": "Progressing",
                "status": "False",
                "reason": "ProgressDeadlineExceeded",
                "message": "slow",
            }
        ],
    )
    pools = {"router": PoolState.of(deployment_status(1, 1, 1)), "decode": PoolState.of(stalled)}
    status = cluster_status(2, pools, [], "t")
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")

    assert (degraded["status"], degraded["message"]) == ("True", "decode: slow")


def test_a_colocated_pool_counts_for_readiness_only_when_it_is_rendered() -> None:
    split = {role: PoolState.of(deployment_status(1, 1, 1)) for role in ("router", "prefill", "decode")}
    without = cluster_status(3, split, [], "t")
    starting = cluster_status(3, split | {"colocated": PoolState.of(deployment_status(2, 0, 2))}, [], "t")

    assert conditions(without)["Ready"] == ("True", "AllPoolsReady")
    # null deletes the counts a dropped colocated pool left in the (merge-patched) status
    assert without["pools"]["colocated"] is None
    assert conditions(starting)["Ready"] == ("False", "PoolsNotReady")
    assert starting["pools"]["colocated"] == {"replicas": 2, "readyReplicas": 0, "updatedReplicas": 2}
    # Without any pool states (an invalid spec) the last counts stay as they are.
    assert cluster_status(3, {}, [], "t", spec_error="spec.colocated: bad")["pools"] == {}


def test_an_invalid_spec_is_degraded_with_its_message_and_keeps_transition_times() -> None:
    error = "spec.decode: set replicas or autoscaling, not both"
    first = cluster_status(4, {}, [], "2026-11-22T10:00:00Z", spec_error=error)
    again = cluster_status(4, {}, first["conditions"], "2026-11-22T10:05:00Z", spec_error=error)

    degraded = next(c for c in again["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"], degraded["message"]) == ("True", "InvalidSpec", error)
    assert degraded["lastTransitionTime"] == "2026-11-22T10:00:00Z"
    assert conditions(again)["Ready"] == ("False", "InvalidSpec")


def test_an_apply_failure_is_degraded_and_leaves_readiness_unknown() -> None:
    status = cluster_status(5, {}, [], "t", apply_error="cannot apply: 403 Forbidden")

    assert conditions(status) == {
        "Ready": ("Unknown", "ApplyFailed"),
        "Progressing": ("Unknown", "ApplyFailed"),
        "Degraded": ("True", "ApplyFailed"),
    }
    assert (
        next(c for c in status["conditions"] if c["type"] == "Degraded")["message"]
        == "cannot apply: 403 Forbidden"
    )
