"""The cluster token and the managed Redis's password on Kubernetes: every pod reads them from Secrets, and the
operator creates the generated Secrets once, owned by the cluster, never overwriting one.

create_if_absent() runs against a stand-in for the API server's Secret resource (no API server runs here; the
real one is exercised by k8s/test-apiserver.sh), raising the kubernetes client's own NotFound/Conflict errors.
"""

from __future__ import annotations

import base64
import copy
from typing import Any

import kubernetes_validate
import pytest
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic.exceptions import ConflictError, ForbiddenError, NotFoundError

from ops.operator.cluster_secrets import (
    GeneratedSecret,
    create_if_absent,
    generated_secrets,
    new_secret_body,
    secret_body,
)
from ops.operator.labels import Owner
from ops.operator.render import render
from ops.operator.spec import SpecError, parse_spec

CPU_DEMO: dict[str, Any] = {"model": {"name": "demo-model", "demo": True}}
OWN_TOKEN: dict[str, Any] = {
    **CPU_DEMO,
    "colocated": {"replicas": 1},
    "clusterTokenSecret": {"name": "team-token"},
    "redis": {"external": {"secretName": "redis-url"}},
}
OWNER = Owner("splitserve.io/v1alpha1", "SplitserveCluster", "demo", "0f7c6a50-uid")
KUBERNETES_VERSION = kubernetes_validate.latest_version()


def containers_by_deployment(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0] for d in deployments}


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def assert_valid(body: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(body, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{body['kind']}/{body['metadata']['name']}: {exc.message} at {list(exc.path)}")


# -- render: references only ------------------------------------------------------------------------------------


def test_every_node_and_router_reads_the_generated_cluster_token() -> None:
    objects = render("demo", "ns", {**CPU_DEMO, "colocated": {"replicas": 1}}, owner=OWNER)
    containers = containers_by_deployment(objects)

    pods = ["demo-colocated", "demo-decode", "demo-prefill", "demo-router"]
    assert sorted(set(containers) - {"demo-redis"}) == pods
    for name in pods:
        token = env_of(containers[name])["SPLITSERVE_CLUSTER_TOKEN"]
        assert token == {"secretKeyRef": {"name": "demo-cluster-token", "key": "token"}}, name
        assert not any("token" in arg for arg in containers[name]["args"]), "the token stays out of argv"
    # render() is pure: it names the Secrets but never makes them (no value to put in one).
    assert not [o for o in objects if o["kind"] == "Secret"]
    for body in objects:
        assert_valid(body)


def test_a_user_named_token_secret_is_used_and_none_is_generated() -> None:
    objects = render("demo", "ns", OWN_TOKEN)

    for name, container in containers_by_deployment(objects).items():
        token = env_of(container)["SPLITSERVE_CLUSTER_TOKEN"]
        assert token == {"secretKeyRef": {"name": "team-token", "key": "token"}}, name
    custom_key = render("demo", "ns", {**OWN_TOKEN, "clusterTokenSecret": {"name": "t", "key": "cluster"}})
    for container in containers_by_deployment(custom_key).values():
        assert env_of(container)["SPLITSERVE_CLUSTER_TOKEN"]["secretKeyRef"] == {
            "name": "t",
            "key": "cluster",
        }
    # An external Redis carries its own credentials in its URL Secret: nothing to generate either.
    assert generated_secrets("demo", parse_spec(OWN_TOKEN)) == ()
    for body in objects:
        assert_valid(body)


def test_a_token_secret_without_a_name_is_refused() -> None:
    with pytest.raises(SpecError, match=r"^spec\.clusterTokenSecret\.name: is required"):
        parse_spec({**CPU_DEMO, "clusterTokenSecret": {"key": "token"}})


def test_the_managed_redis_requires_a_password_that_every_pod_url_carries() -> None:
    containers = containers_by_deployment(render("demo", "ns", CPU_DEMO))
    password = {"secretKeyRef": {"name": "demo-redis-auth", "key": "password"}}

    redis = containers["demo-redis"]
    assert env_of(redis)["REDIS_PASSWORD"] == password
    assert redis["args"][redis["args"].index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    for name in ("demo-router", "demo-prefill", "demo-decode"):
        env = [e["name"] for e in containers[name]["env"]]
        # The kubelet expands $(VAR) only from variables defined earlier in the list.
        assert env.index("SPLITSERVE_REDIS_PASSWORD") < env.index("SPLITSERVE_REDIS_URL")
        assert env_of(containers[name])["SPLITSERVE_REDIS_PASSWORD"] == password
        url = env_of(containers[name])["SPLITSERVE_REDIS_URL"]
        assert url == "redis://:$(SPLITSERVE_REDIS_PASSWORD)@demo-redis:6379/0"


# -- the Secrets the operator makes ----------------------------------------------------------------------------


def test_the_operator_generates_a_token_and_a_redis_password_owned_by_the_cluster() -> None:
    wanted = generated_secrets("demo", parse_spec(CPU_DEMO))
    assert [(s.name, s.key) for s in wanted] == [
        ("demo-cluster-token", "token"),
        ("demo-redis-auth", "password"),
    ]

    bodies = [new_secret_body("demo", "ns", secret, OWNER) for secret in wanted]
    values = []
    for secret, body in zip(wanted, bodies, strict=True):
        assert_valid(body)
        (reference,) = body["metadata"]["ownerReferences"]
        assert reference["uid"] == OWNER.uid and reference["blockOwnerDeletion"] is True
        assert body["metadata"]["namespace"] == "ns"
        value = base64.b64decode(body["data"][secret.key]).decode()
        assert len(value) >= 43 and value.replace("-", "").replace("_", "").isalnum()  # 256 bits, URL-safe
        values.append(value)
    again = new_secret_body("demo", "ns", wanted[0], OWNER)
    assert len({*values, base64.b64decode(again["data"]["token"]).decode()}) == 3, "every value is fresh"


def test_a_secret_body_holds_exactly_the_given_value() -> None:
    body = secret_body("demo", "ns", GeneratedSecret("demo-x", "k", "cluster-token"), "s3cret", None)
    assert body["data"] == {"k": base64.b64encode(b"s3cret").decode()}
    assert "ownerReferences" not in body["metadata"]


class SecretsStandIn:
    """The v1 Secret resource of a DynamicClient, keeping Secrets in a dict and failing as the API server does."""

    def __init__(self, existing: dict[tuple[str, str], dict[str, Any]] | None = None) -> None:
        self.stored = existing or {}
        self.created: list[str] = []
        self.appears_before_create: dict[str, Any] | None = None  # another writer's Secret, for the race
        self.fail_with: ApiException | None = None

    def get(self, *, name: str, namespace: str) -> Any:
        if self.fail_with is not None:
            raise self.fail_with
        if (namespace, name) not in self.stored:
            raise NotFoundError(ApiException(status=404, reason="Not Found"))
        return self.stored[(namespace, name)]

    def create(self, *, body: dict[str, Any], namespace: str) -> Any:
        key = (namespace, body["metadata"]["name"])
        if self.appears_before_create is not None:
            self.stored[key] = self.appears_before_create
        if key in self.stored:
            raise ConflictError(ApiException(status=409, reason="Conflict"))
        self.stored[key] = copy.deepcopy(body)
        self.created.append(body["metadata"]["name"])
        return body


def test_a_missing_secret_is_created_once_and_then_left_alone() -> None:
    secret = generated_secrets("demo", parse_spec(CPU_DEMO))[0]
    api = SecretsStandIn()

    assert create_if_absent(api, new_secret_body("demo", "ns", secret, OWNER)) is True
    first = copy.deepcopy(api.stored[("ns", "demo-cluster-token")])
    # Every resync brings a fresh value; the running pods keep the first one.
    for _ in range(3):
        assert create_if_absent(api, new_secret_body("demo", "ns", secret, OWNER)) is False
    assert api.created == ["demo-cluster-token"]
    assert api.stored[("ns", "demo-cluster-token")] == first


def test_an_existing_secret_is_never_overwritten_even_when_made_by_someone_else() -> None:
    secret = generated_secrets("demo", parse_spec(CPU_DEMO))[0]
    theirs = {"metadata": {"name": "demo-cluster-token"}, "data": {"token": "dGhlaXJz"}}
    api = SecretsStandIn({("ns", "demo-cluster-token"): theirs})
    assert create_if_absent(api, new_secret_body("demo", "ns", secret, OWNER)) is False
    assert api.stored[("ns", "demo-cluster-token")] is theirs

    # Created by another writer between our read and our create: the conflict keeps theirs.
    racing = SecretsStandIn()
    racing.appears_before_create = theirs
    assert create_if_absent(racing, new_secret_body("demo", "ns", secret, OWNER)) is False
    assert racing.stored[("ns", "demo-cluster-token")] is theirs and racing.created == []


def test_other_api_errors_reach_the_handler_without_the_value() -> None:
    secret = generated_secrets("demo", parse_spec(CPU_DEMO))[0]
    api = SecretsStandIn()
    api.fail_with = ForbiddenError(ApiException(status=403, reason="Forbidden"))
    body = new_secret_body("demo", "ns", secret, OWNER)
    with pytest.raises(ApiException) as caught:  # the handler turns it into kopf.TemporaryError (a retry)
        create_if_absent(api, body)
    assert caught.value.status == 403
    value = base64.b64decode(body["data"]["token"]).decode()
    assert value not in str(caught.value) and api.created == []
