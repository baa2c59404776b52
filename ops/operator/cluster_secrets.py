"""The Secrets the operator generates for a cluster: its cluster token and the managed Redis's password.

render() stays pure and never sees a secret value: it only references these Secrets by name (secretKeyRef), so
`splitserve operator --render` prints no secret and server-side apply never rewrites one. The handler creates them:
1. generated_secrets(cluster, spec) names the Secrets this spec needs the operator to make: NAME-cluster-token (key
   `token`) unless spec.clusterTokenSecret names the user's own, and NAME-redis-auth (key `password`) when Redis
   is managed.
2. For each, secret_body() builds the Secret with a fresh random value, owned by the SplitserveCluster (Kubernetes'
   garbage collector deletes it with the cluster), and create_if_absent() creates it only when no Secret of that
   name exists. An existing Secret is never read back or overwritten: a new token would cut the running pods off
   from each other. Pruning does not list Secrets either (apply.MANAGED_KINDS), so none is deleted while the
   cluster exists.
No value reaches a log line, an event or the status: only the Secrets' names do.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass
from typing import Any, Protocol

from ops.operator.labels import Owner, metadata, object_name
from ops.operator.spec import ClusterSpec, SecretRef

CLUSTER_TOKEN_COMPONENT = "cluster-token"
CLUSTER_TOKEN_KEY = "token"
REDIS_AUTH_COMPONENT = "redis-auth"
REDIS_PASSWORD_KEY = "password"


@dataclass(frozen=True, slots=True)
class GeneratedSecret:
    """A Secret the operator makes for a cluster: one random value under one key."""

    name: str
    key: str
    component: str  # the app.kubernetes.io/component label


def cluster_token_ref(cluster: str, spec: ClusterSpec) -> SecretRef:
    """Where every pod reads SPLITSERVE_CLUSTER_TOKEN: the user's Secret if the spec names one, else the generated."""
    if spec.cluster_token is not None:
        return spec.cluster_token
    return SecretRef(object_name(cluster, CLUSTER_TOKEN_COMPONENT), CLUSTER_TOKEN_KEY)


def redis_password_ref(cluster: str) -> SecretRef:
    """The managed Redis's password (requirepass), which the pods' Redis URL carries."""
    return SecretRef(object_name(cluster, REDIS_AUTH_COMPONENT), REDIS_PASSWORD_KEY)


def generated_secrets(cluster: str, spec: ClusterSpec) -> tuple[GeneratedSecret, ...]:
    """The Secrets the operator must make for this spec (the user's own clusterTokenSecret is not one of them)."""
    made = []
    if spec.cluster_token is None:
        token = cluster_token_ref(cluster, spec)
        made.append(GeneratedSecret(token.name, token.key, CLUSTER_TOKEN_COMPONENT))
    if spec.redis.external_url is None:
        password = redis_password_ref(cluster)
        made.append(GeneratedSecret(password.name, password.key, REDIS_AUTH_COMPONENT))
    return tuple(made)


def secret_body(
    cluster: str, namespace: str, secret: GeneratedSecret, value: str, owner: Owner | None
) -> dict[str, Any]:
    """The Secret object holding `value` (URL-safe: it goes into a Redis URL unescaped)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(secret.name, namespace, cluster, secret.component, owner),
        "type": "Opaque",
        "data": {secret.key: base64.b64encode(value.encode()).decode()},
    }


def new_secret_body(
    cluster: str, namespace: str, secret: GeneratedSecret, owner: Owner | None
) -> dict[str, Any]:
    """secret_body() with a fresh random value (256 bits, URL-safe)."""
    # Not cluster.auth.generate_token: that module loads grpc, which the operator does not need.
    return secret_body(cluster, namespace, secret, secrets.token_urlsafe(32), owner)


class SecretsResource(Protocol):
    """The part of a DynamicClient's v1 Secret resource that create_if_absent() uses."""

    def get(self, *, name: str, namespace: str) -> Any: ...

    def create(self, *, body: dict[str, Any], namespace: str) -> Any: ...


def create_if_absent(resource: SecretsResource, body: dict[str, Any]) -> bool:
    """Create the Secret `body` unless one of its name exists; True if this call created it.

    Any other API error propagates (the handler turns it into a retry)."""
    from kubernetes.dynamic.exceptions import ConflictError, NotFoundError

    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    try:
        resource.get(name=name, namespace=namespace)
        return False
    except NotFoundError:
        pass
    try:
        resource.create(body=body, namespace=namespace)
    except ConflictError:  # another operator replica made it between our read and create: theirs stays
        return False
    return True
