"""The operator's kopf handlers: SplitserveCluster -> render() -> server-side apply -> status.

Life cycle of one SplitserveCluster:
1. create / update (spec changed) / resume (operator restarted): parse and render the spec, create the cluster's
   generated Secrets (cluster token, Redis password) that do not exist yet, apply every object, delete managed
   objects it no longer renders, write the status. Secret values never reach render(), a log line or the status.
2. every RESYNC_INTERVAL_S: the same again, which repairs drift and refreshes the pools' ready counts.
3. deletion: nothing to do; every object carries an ownerReference, so Kubernetes' garbage collector removes it.

A spec that fails validation is not an error to retry: it becomes the Degraded condition's message (and a Warning
event), and the handler returns, so a bad resource never makes the operator loop. API failures (a conflict, the
API server restarting, a kind it does not serve) become Degraded (reason ApplyFailed) and kopf retries them after
API_RETRY_DELAY_S.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
from collections.abc import Iterator
from typing import Any

import kopf

from ops.operator.apply import ClusterApplier
from ops.operator.cluster_secrets import generated_secrets, new_secret_body
from ops.operator.labels import COMPONENT, GROUP, PLURAL, VERSION, Owner
from ops.operator.render import render
from ops.operator.spec import POOLS, SpecError, parse_spec
from ops.operator.status import PoolState, cluster_status

RESYNC_INTERVAL_S = 20.0
API_RETRY_DELAY_S = 30.0
ANNOTATION_PREFIX = "splitserve.io"

registry = kopf.OperatorRegistry()
log = logging.getLogger(__name__)


@kopf.on.startup(registry=registry)
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:  # running outside a cluster: the user's kubeconfig
        config.load_kube_config()
    # kopf's bookkeeping goes into annotations: the CRD's structural schema would prune it from status.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=ANNOTATION_PREFIX)
    settings.posting.level = logging.WARNING


@kopf.on.login(registry=registry)
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # A registry of our own starts empty: kopf's default login (through the kubernetes client) must be named.
    return kopf.login_via_client(**kwargs)


@kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry)
@kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
@kopf.on.update(GROUP, VERSION, PLURAL, registry=registry)
def reconcile(
    body: kopf.Body, spec: kopf.Spec, name: str, namespace: str | None, patch: kopf.Patch, **_: Any
) -> None:
    _reconcile(body, spec, _namespace_of(namespace), name, patch, announce_errors=True)


@kopf.timer(
    GROUP, VERSION, PLURAL, interval=RESYNC_INTERVAL_S, initial_delay=RESYNC_INTERVAL_S, registry=registry
)
def resync(
    body: kopf.Body, spec: kopf.Spec, name: str, namespace: str | None, patch: kopf.Patch, **_: Any
) -> None:
    """Repairs drift (a deleted Service, a hand-edited Deployment) and refreshes the pools' ready counts; applying
    unchanged objects is a no-op for the API server."""
    _reconcile(body, spec, _namespace_of(namespace), name, patch, announce_errors=False)


def _reconcile(
    body: kopf.Body, spec: kopf.Spec, namespace: str, name: str, patch: kopf.Patch, *, announce_errors: bool
) -> None:
    owner = Owner.of(body)
    try:
        parsed = parse_spec(dict(spec))
        objects = render(name, namespace, parsed, owner=owner)
    except SpecError as exc:
        # What runs stays as it is: a bad edit must not take a serving cluster down.
        if announce_errors:
            kopf.warn(body, reason="InvalidSpec", message=str(exc))
        # No API read on this path (the last ready counts stay in status): the message must get out even when
        # the API server cannot list Deployments.
        _patch_status(patch, body, cluster_status(_generation(body), {}, _conditions(body), _now(), str(exc)))
        return
    try:
        with _api_errors_retried("apply"):
            applier = ClusterApplier()  # discovers the server's kinds: an API call
            # Before the pods: a pod whose secretKeyRef names a missing Secret waits until it exists.
            for secret in generated_secrets(name, parsed):
                if applier.create_secret_if_absent(new_secret_body(name, namespace, secret, owner)):
                    log.info("%s/%s: created Secret %s", namespace, name, secret.name)
            applier.apply(objects)
            for deleted in applier.prune(namespace, name, objects):
                log.info("%s/%s: deleted %s (no longer rendered)", namespace, name, deleted)
    except kopf.TemporaryError as exc:  # kopf still writes the patch, then retries
        status = cluster_status(_generation(body), {}, _conditions(body), _now(), apply_error=str(exc))
        _patch_status(patch, body, status)
        raise
    _write_status(patch, body, applier, namespace, name, objects)


def _namespace_of(namespace: str | None) -> str:
    if namespace is None:  # the CRD is namespaced; only a hand-made cluster-scoped copy could get here
        raise kopf.PermanentError("a SplitserveCluster must be namespaced")
    return namespace


def _write_status(
    patch: kopf.Patch,
    body: kopf.Body,
    applier: ClusterApplier,
    namespace: str,
    name: str,
    objects: list[dict[str, Any]],
) -> None:
    with _api_errors_retried("read Deployments"):
        deployments = applier.deployments(namespace, name)
    # Ready waits for every Deployment render() made: the managed Redis too, a colocated pool only when it has pods.
    rendered = {o["metadata"]["labels"][COMPONENT] for o in objects if o["kind"] == "Deployment"}
    pools = {
        component: PoolState.of(deployments.get(component))
        for component in (*POOLS, "redis")
        if component in rendered
    }
    _patch_status(patch, body, cluster_status(_generation(body), pools, _conditions(body), _now()))


def _patch_status(patch: kopf.Patch, body: kopf.Body, status: dict[str, Any]) -> None:
    for key, value in status.items():
        patch.status[key] = value


def _generation(body: kopf.Body) -> int:
    return int(body.get("metadata", {}).get("generation") or 0)


def _conditions(body: kopf.Body) -> list[dict[str, Any]]:
    return list((body.get("status") or {}).get("conditions") or [])


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@contextlib.contextmanager
def _api_errors_retried(action: str) -> Iterator[None]:
    """Turns a Kubernetes API failure into kopf.TemporaryError: kopf retries after a delay instead of crashing."""
    from kubernetes.client.exceptions import ApiException
    from kubernetes.dynamic.exceptions import ResourceNotFoundError
    from urllib3.exceptions import HTTPError

    try:
        yield
    except ApiException as exc:
        raise kopf.TemporaryError(
            f"cannot {action}: {exc.status} {exc.reason}", delay=API_RETRY_DELAY_S
        ) from exc
    except (
        ResourceNotFoundError,
        HTTPError,
    ) as exc:  # a kind the server does not serve; the server unreachable
        raise kopf.TemporaryError(f"cannot {action}: {exc}", delay=API_RETRY_DELAY_S) from exc
