"""The checks k8s/test-apiserver.sh runs once its API server is up (KUBECONFIG points at it).

Usage: python k8s/apiserver_checks.py SPLITSERVE_EXECUTABLE WORK_DIR. Exits non-zero with one line per failure.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from ops.operator.crd import crd
from ops.operator.labels import GROUP, PLURAL, VERSION

NAMESPACE = "default"
EXAMPLE = Path(__file__).resolve().parent / "examples" / "cpu-demo.yaml"
OPERATOR_DEADLINE_S = 90.0


def main(splitserve: str, work: Path) -> int:
    config.load_kube_config()
    failures: list[str] = []
    install_crd()
    failures += check_schema_rejections()
    failures += check_defaults()
    failures += check_operator(splitserve, work)
    for failure in failures:
        print(f"test-apiserver: FAIL {failure}")
    print(f"test-apiserver: {'all checks passed' if not failures else f'{len(failures)} checks failed'}")
    return 1 if failures else 0


def install_crd() -> None:
    api = client.ApiextensionsV1Api()
    body = crd()
    api.create_custom_resource_definition(body)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = api.read_custom_resource_definition(body["metadata"]["name"]).status
        if any(c.type == "Established" and c.status == "True" for c in status.conditions or []):
            print("test-apiserver: CRD established")
            return
        time.sleep(0.5)
    raise SystemExit("test-apiserver: the CRD was not Established within 30 s")


def example(name: str, **spec_changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    body["metadata"] = {"name": name}
    for section, value in spec_changes.items():
        body["spec"][section] = value
    return copy.deepcopy(body)


def create(body: dict[str, Any]) -> dict[str, Any]:
    created: dict[str, Any] = client.CustomObjectsApi().create_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, PLURAL, body
    )
    return created


def read(name: str) -> dict[str, Any]:
    found: dict[str, Any] = client.CustomObjectsApi().get_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, PLURAL, name
    )
    return found


def check_schema_rejections() -> list[str]:
    cases = [
        ("negative", {"decode": {"replicas": -1}}, "should be greater than or equal to 0"),
        ("backend", {"kvTransfer": {"backend": "mooncake"}}, 'supported values: "nixl", "torch"'),
        (
            "both",
            {"decode": {"replicas": 2, "autoscaling": {"maxReplicas": 3}}},
            "set replicas or autoscaling",
        ),
        (
            "minmax",
            {"decode": {"autoscaling": {"minReplicas": 4, "maxReplicas": 2}}},
            "minReplicas must not exceed",
        ),
        ("sources", {"model": {"name": "m", "demo": True, "pvcName": "p"}}, "exactly one of pvcName"),
        (
            "colocated-both",
            {"colocated": {"replicas": 2, "autoscaling": {"maxReplicas": 3}}},
            "set replicas or autoscaling",
        ),
        # bad-<this> is 54 characters: fine without a colocated pool, one too many for NAME-colocated
        ("colocated-name".ljust(50, "x"), {"colocated": {"replicas": 1}}, "with a colocated pool the name"),
    ]
    failures = []
    for name, changes, expected in cases:
        try:
            create(example(f"bad-{name}", **changes))
            failures.append(f"the API server accepted bad-{name}")
        except ApiException as exc:
            if exc.status != 422 or expected not in json.loads(exc.body)["message"]:
                failures.append(f"bad-{name}: expected 422 with {expected!r}, got {exc.status}: {exc.body}")
            else:
                print(f"test-apiserver: rejected bad-{name}: {expected}")
    return failures


def check_defaults() -> list[str]:
    create(example("defaults"))
    spec = read("defaults")["spec"]
    expected = {
        ("router", "policy"): "jsq",
        ("prefill", "drainTimeoutSeconds"): 30,
        ("decode", "machineType"): "cpu",
        ("kvTransfer", "backend"): "nixl",
        ("model", "mountPath"): "/models",
    }
    failures = [
        f"default {section}.{key}: expected {value!r}, got {spec.get(section, {}).get(key)!r}"
        for (section, key), value in expected.items()
        if spec.get(section, {}).get(key) != value
    ]
    if "replicas" in spec.get("decode", {}):
        failures.append("replicas was defaulted: it would clash with autoscaling")
    if "colocated" in spec:
        failures.append("an absent colocated pool was stored with defaults")
    create(example("colocated", colocated={"replicas": 1}))
    colocated = read("colocated")["spec"]["colocated"]
    if (colocated.get("replicas"), colocated.get("machineType")) != (1, "cpu"):
        failures.append(f"a colocated pool was stored as {colocated!r}, without its defaults")
    if not failures:
        print("test-apiserver: defaults stored")
    return failures


def check_operator(splitserve: str, work: Path) -> list[str]:
    log_path = work / "operator.log"
    with log_path.open("w") as log:
        operator = subprocess.Popen(
            [splitserve, "operator", "--all-namespaces"], stdout=log, stderr=subprocess.STDOUT, env=os.environ
        )
    try:
        create(example("bad-machine", prefill={"machineType": "tpu-v9"}))
        failures = wait_for_degraded("bad-machine", "spec.prefill.machineType: unknown machine type 'tpu-v9'")
        # Fixed, it renders; applying fails here (this server has no ServiceAccounts or Deployments) and says so.
        fix = {"spec": {"prefill": {"machineType": "dgx-h100"}}}
        client.CustomObjectsApi().patch_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PLURAL, "bad-machine", fix
        )
        failures += wait_for_degraded("bad-machine", "cannot apply: No matches found for")
        if operator.poll() is not None:
            failures.append(f"the operator exited with code {operator.returncode}")
        if "cannot apply" not in log_path.read_text():
            failures.append("the operator did not log that it cannot apply the objects")
    finally:
        operator.send_signal(signal.SIGTERM)
        try:
            operator.wait(timeout=30)
        except subprocess.TimeoutExpired:
            operator.kill()
            operator.wait(timeout=10)
    if failures:
        print(f"--- operator log (tail)\n{''.join(log_path.read_text().splitlines(True)[-30:])}")
    return failures


def wait_for_degraded(name: str, message: str) -> list[str]:
    deadline = time.monotonic() + OPERATOR_DEADLINE_S
    conditions: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        conditions = (read(name).get("status") or {}).get("conditions") or []
        degraded = next((c for c in conditions if c["type"] == "Degraded"), None)
        if degraded and degraded["status"] == "True" and degraded["message"].startswith(message):
            print(f"test-apiserver: {name} is Degraded: {degraded['message']}")
            return []
        time.sleep(1)
    return [
        f"{name}: no Degraded condition starting {message!r} within {OPERATOR_DEADLINE_S} s: {conditions}"
    ]


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], Path(sys.argv[2])))
