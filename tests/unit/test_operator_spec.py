"""SplitserveCluster specs: defaults filled in, and every bad spec rejected with one line naming the field."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from ops.operator.spec import DEFAULTS, SpecError, check_cluster_name, parse_spec

MINIMAL: dict[str, Any] = {"model": {"name": "demo-model", "demo": True}}


def with_fields(**sections: Any) -> dict[str, Any]:
    spec = copy.deepcopy(MINIMAL)
    spec.update(sections)
    return spec


def test_a_minimal_spec_gets_every_default() -> None:
    spec = parse_spec(MINIMAL)

    assert spec.image == DEFAULTS["image"]
    assert spec.model.directory == "/models/demo-model"
    assert [pool.role for pool in spec.pools()] == ["router", "prefill", "decode"]
    assert spec.colocated.replicas == DEFAULTS["colocated.replicas"] == 0  # optional: not rendered
    for pool in spec.pools():
        assert pool.replicas == 1 and pool.autoscaling is None and pool.gpus == 0
        assert pool.drain_timeout_s == DEFAULTS["pool.drainTimeoutSeconds"]
    assert spec.placement.policy == "jsq"
    assert spec.kv_transfer.backend == "nixl"
    assert spec.redis.external_url is None and spec.redis.image == DEFAULTS["redis.image"]
    assert spec.api_key is None


def test_autoscaling_leaves_replicas_to_the_autoscaler_and_defaults_a_cpu_target() -> None:
    spec = parse_spec(
        with_fields(decode={"autoscaling": {"maxReplicas": 6}, "resources": {"requests": {"cpu": 2}}})
    )

    assert spec.decode.replicas is None
    assert spec.decode.autoscaling is not None
    assert (spec.decode.autoscaling.min_replicas, spec.decode.autoscaling.max_replicas) == (1, 6)
    assert spec.decode.autoscaling.target_cpu_percent == DEFAULTS["autoscaling.targetCPUUtilizationPercent"]
    assert spec.decode.resources.requests == {"cpu": "2"}


def test_a_colocated_pool_with_pods_or_autoscaling_is_rendered() -> None:
    fixed = parse_spec(with_fields(colocated={"replicas": 2, "machineType": "dgx-a100", "gpus": 8}))
    scaled = parse_spec(
        with_fields(colocated={"autoscaling": {"maxReplicas": 4}, "resources": {"requests": {"cpu": 1}}})
    )

    assert [pool.role for pool in fixed.pools()][-1] == "colocated"
    assert (fixed.colocated.replicas, fixed.colocated.machine_type, fixed.colocated.gpus) == (
        2,
        "dgx-a100",
        8,
    )
    assert scaled.colocated.replicas is None and scaled.colocated in scaled.pools()
    assert parse_spec(with_fields(colocated={"replicas": 0})).pools() == parse_spec(MINIMAL).pools()


def test_secret_references_take_their_default_keys() -> None:
    spec = parse_spec(
        with_fields(redis={"external": {"secretName": "redis-url"}}, apiKeySecret={"name": "api"})
    )

    assert spec.redis.external_url is not None
    assert (spec.redis.external_url.name, spec.redis.external_url.key) == ("redis-url", "url")
    assert spec.api_key is not None and (spec.api_key.name, spec.api_key.key) == ("api", "api-key")


BAD_SPECS = [
    (with_fields(prefill={"replicas": -1}), "spec.prefill.replicas: must be >= 0, got -1"),
    (
        with_fields(decode={"replicas": 2, "autoscaling": {"maxReplicas": 4}}),
        "spec.decode: set replicas or autoscaling, not both",
    ),
    (
        with_fields(decode={"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}),
        "spec.decode.autoscaling: minReplicas 5 is greater than maxReplicas 2",
    ),
    (
        with_fields(decode={"autoscaling": {"minReplicas": 1}}),
        "spec.decode.autoscaling.maxReplicas: is required",
    ),
    (
        with_fields(prefill={"autoscaling": {"maxReplicas": 3}}),
        "spec.prefill.autoscaling: a CPU utilization target needs resources.requests.cpu",
    ),
    (
        with_fields(
            decode={"autoscaling": {"maxReplicas": 3, "targetCPUUtilizationPercent": 50, "podsMetric": {}}}
        ),
        "spec.decode.autoscaling: set targetCPUUtilizationPercent or podsMetric, not both",
    ),
    (
        with_fields(kvTransfer={"backend": "mooncake"}),
        "spec.kvTransfer.backend: unknown KV transfer backend 'mooncake' (known: nixl, torch)",
    ),
    (
        with_fields(kvTransfer={"backend": "torch", "ucxTransports": "tcp"}),
        "spec.kvTransfer.ucxTransports: applies to the nixl backend only",
    ),
    (
        with_fields(redis={"managed": {}, "external": {"secretName": "r"}}),
        "spec.redis: set managed or external, not both",
    ),
    (with_fields(redis={"external": {}}), "spec.redis.external.secretName: is required"),
    ({"model": {"name": "m"}}, "spec.model: set exactly one of pvcName, hostPath or demo: true"),
    (
        {"model": {"name": "m", "pvcName": "a", "hostPath": "/b"}},
        "spec.model: set exactly one of pvcName, hostPath or demo: true",
    ),
    ({"model": {"name": "a/b", "demo": True}}, "spec.model.name: must be a directory name"),
    ({}, "spec.model: is required"),
    (
        with_fields(prefill={"machineType": "tpu-v9"}),
        "spec.prefill.machineType: unknown machine type 'tpu-v9'",
    ),
    (
        with_fields(decode={"tensorParallelSize": 0}),
        "spec.decode.tensorParallelSize: must be",
    ),
    (
        with_fields(decode={"resources": {"limits": {"nvidia.com/gpu": 1}}}),
        "spec.decode.resources: set GPUs with the pool's gpus field",
    ),
    (
        with_fields(prefill={"resources": {"requests": {"memory": "lots"}}}),
        "spec.prefill.resources.requests.memory: must be a Kubernetes quantity",
    ),
    (with_fields(router={"gpus": 1}), "spec.router.gpus: unknown field"),
    (with_fields(decode={"replcas": 2}), "spec.decode.replcas: unknown field"),
    (with_fields(decode={"replicas": "2"}), "spec.decode.replicas: must be an integer, got '2'"),
    (with_fields(decode={"replicas": True}), "spec.decode.replicas: must be an integer, got True"),
    (
        with_fields(decode={"env": {"1BAD": "x"}}),
        "spec.decode.env: '1BAD' is not a valid environment variable",
    ),
    (with_fields(router={"extraArgs": "--verbose"}), "spec.router.extraArgs: must be a list of strings"),
    (
        with_fields(imagePullPolicy="Sometimes"),
        "spec.imagePullPolicy: must be one of Always, IfNotPresent, Never",
    ),
    (with_fields(decode=[1, 2]), "spec.decode: must be an object, got list"),
    (with_fields(colocated={"replicas": -2}), "spec.colocated.replicas: must be >= 0, got -2"),
    (
        with_fields(colocated={"replicas": 1, "autoscaling": {"maxReplicas": 4}}),
        "spec.colocated: set replicas or autoscaling, not both",
    ),
    (
        with_fields(colocated={"machineType": "tpu-v9"}),
        "spec.colocated.machineType: unknown machine type 'tpu-v9'",
    ),
    (with_fields(colocated={"policy": "jsq"}), "spec.colocated.policy: unknown field"),
]


@pytest.mark.parametrize(("raw", "expected"), BAD_SPECS, ids=[expected for _, expected in BAD_SPECS])
def test_a_bad_spec_is_one_line_naming_the_field(raw: dict[str, Any], expected: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(raw)

    message = str(caught.value)
    assert message.startswith(expected)
    assert "\n" not in message


def test_a_custom_machine_catalog_admits_machine_types_the_built_ins_lack() -> None:
    spec = parse_spec(
        with_fields(prefill={"machineType": "my-box"}, machineCatalog={"configMapName": "machines"})
    )

    assert spec.prefill.machine_type == "my-box"
    assert spec.machine_catalog is not None and spec.machine_catalog.key == "machines.json"


@pytest.mark.parametrize("name", ["Demo", "a_b", "x" * 56, "-a"])
def test_cluster_names_must_leave_room_for_the_pool_suffix(name: str) -> None:
    with pytest.raises(SpecError, match=r"^metadata\.name: must be a DNS label"):
        check_cluster_name(name)


def test_the_longest_allowed_name_passes() -> None:
    check_cluster_name("x" * 55)


def test_a_colocated_pool_needs_room_for_its_longer_suffix() -> None:
    check_cluster_name("x" * 53, colocated=True)
    with pytest.raises(SpecError, match=r"^metadata\.name: .* at most 53 characters with a colocated pool"):
        check_cluster_name("x" * 54, colocated=True)
