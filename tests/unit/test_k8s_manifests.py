"""Everything under k8s/ and everything render() makes is valid Kubernetes, and the CRD's schema is structural.

- Rendered objects and every kustomization's output (`kubectl kustomize`) pass kubernetes-validate --strict (unknown
  fields fail) for the newest Kubernetes version it bundles.
- The committed CRD and k8s/base are what `splitserve operator --print-crd` / `--render` generate today.
- The CRD's openAPIV3Schema follows the API server's structural-schema rules (checked by structural_violations,
  itself tested on schemas that break each rule), its defaults agree with spec.py's, and the example resources
  validate against it.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from ops.cli import main as cli_main
from ops.operator.command import standalone_objects
from ops.operator.crd import crd
from ops.operator.render import render
from ops.operator.spec import parse_spec

K8S = Path(__file__).resolve().parents[2] / "k8s"
KUBERNETES_VERSION = kubernetes_validate.latest_version()
EXAMPLES = sorted((K8S / "examples").glob("*.yaml"))
KUSTOMIZATIONS = sorted(path.parent for path in K8S.rglob("kustomization.yaml"))
COMMITTED_CRD = K8S / "crd" / "splitserveclusters.splitserve.io.yaml"
needs_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (for kubectl kustomize) is not installed"
)


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kustomize(directory: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, f"kubectl kustomize {directory}: {out.stderr.strip()}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc is not None]


def assert_valid(documents: list[dict[str, Any]], source: str) -> None:
    assert documents, f"{source}: no objects"
    for body in documents:
        where = f"{source}: {body.get('kind')}/{body.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(body, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {exc.message} at {'.'.join(str(p) for p in exc.path)}")


# -- rendered objects and manifests ----------------------------------------------------------------------------


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_rendered_objects_are_valid_kubernetes(example: Path) -> None:
    (document,) = load_documents(example)
    objects = render(document["metadata"]["name"], "team-a", document["spec"])

    assert_valid(objects, f"render({example.name})")


def test_kubernetes_validate_rejects_unknown_fields() -> None:
    (document,) = load_documents(K8S / "examples" / "cpu-demo.yaml")
    objects = render("demo", "ns", document["spec"])
    broken = copy.deepcopy(next(o for o in objects if o["kind"] == "Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["drainTimeout"] = 30

    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


@needs_kubectl
@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def test_every_kustomization_builds_into_valid_kubernetes(directory: Path) -> None:
    assert_valid(kustomize(directory), f"kubectl kustomize {directory.relative_to(K8S)}")


def test_every_manifest_is_built_by_a_kustomization_or_is_an_example_resource() -> None:
    """No YAML file under k8s/ escapes validation: kustomizations reach the objects and patches (validated after
    the build above), and the example SplitserveClusters validate against the CRD's schema."""
    reached = {directory / "kustomization.yaml" for directory in KUSTOMIZATIONS}
    for directory in KUSTOMIZATIONS:
        kustomization = load_documents(directory / "kustomization.yaml")[0]
        entries = [
            *kustomization.get("resources", []),
            *(p["path"] for p in kustomization.get("patches", []) if "path" in p),
        ]
        reached |= {(directory / entry).resolve() for entry in entries}
    schema = crd_schema()
    for example in EXAMPLES:
        (body,) = load_documents(example)
        assert body["kind"] == "SplitserveCluster"
        jsonschema.validate(apply_defaults(schema, body), schema)

    unreached = [
        p.relative_to(K8S) for p in K8S.rglob("*.yaml") if p.resolve() not in reached and p not in EXAMPLES
    ]
    assert unreached == []


@needs_kubectl
def test_the_overlays_change_what_they_say() -> None:
    cpu = {(o["kind"], o["metadata"]["name"]): o for o in kustomize(K8S / "overlays" / "cpu-demo")}
    gpu = {(o["kind"], o["metadata"]["name"]): o for o in kustomize(K8S / "overlays" / "gpu")}

    assert cpu["Deployment", "splitserve-decode"]["spec"]["replicas"] == 2
    assert cpu["Deployment", "splitserve-decode"]["spec"]["template"]["spec"]["containers"][0]["args"][
        -2:
    ] == [
        "--threads",
        "1",
    ]
    decode = gpu["Deployment", "splitserve-decode"]["spec"]["template"]["spec"]
    main = decode["containers"][0]
    assert main["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "--device=cuda" in main["args"] and "--machine-type=dgx-h100-cap" in main["args"]
    assert main["args"][1:3] == ["--model", "/models/Llama-3.1-8B-Instruct"]
    assert decode["volumes"][0]["persistentVolumeClaim"]["claimName"] == "models"
    assert "initContainers" not in decode
    assert ("ConfigMap", "splitserve-grafana-dashboard") in gpu


# -- generated files -------------------------------------------------------------------------------------------


def test_the_committed_crd_is_the_generated_one() -> None:
    assert load_documents(COMMITTED_CRD) == [crd()], "regenerate: splitserve operator --print-crd"


def test_print_crd_prints_the_crd(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["operator", "--print-crd"]) == 0
    assert list(yaml.safe_load_all(capsys.readouterr().out)) == [crd()]


def test_the_base_is_the_cpu_demo_cluster_rendered() -> None:
    (document,) = load_documents(K8S / "examples" / "cpu-demo.yaml")

    expected = standalone_objects(document, None)
    assert load_documents(K8S / "base" / "splitserve.yaml") == expected, (
        "regenerate: splitserve operator --render k8s/examples/cpu-demo.yaml"
    )
    assert all("namespace" not in o["metadata"] for o in expected)
    assert {o["metadata"]["labels"]["app.kubernetes.io/managed-by"] for o in expected} == {"kubectl"}


def test_render_of_a_bad_file_is_one_line_and_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: splitserve.io/v1alpha1\nkind: SplitserveCluster\nmetadata: {name: x}\n"
        "spec: {model: {name: m, demo: true}, decode: {replicas: -1}}\n"
    )

    assert cli_main(["operator", "--render", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err == f"splitserve operator: error: {bad}: spec.decode.replicas: must be >= 0, got -1\n"


# -- the CRD's schema ------------------------------------------------------------------------------------------


def crd_schema() -> dict[str, Any]:
    (version,) = crd()["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


JUNCTORS = ("allOf", "anyOf", "oneOf", "not")
NOT_IN_JUNCTORS = ("description", "type", "default", "additionalProperties", "nullable")
INT_OR_STRING = [{"type": "integer"}, {"type": "string"}]


def structural_violations(schema: dict[str, Any], path: str = "", *, root: bool = True) -> list[str]:
    """The Kubernetes structural-schema rules a CRD schema breaks (empty: structural), plus its defaults' validity."""
    problems: list[str] = []
    where = path or "<root>"
    int_or_string = schema.get("x-kubernetes-int-or-string") is True
    preserves = schema.get("x-kubernetes-preserve-unknown-fields") is True
    if int_or_string:
        if "type" in schema:
            problems.append(f"{where}: x-kubernetes-int-or-string must not set a type")
    elif not schema.get("type") and not preserves:
        problems.append(f"{where}: no type")
    if "properties" in schema and "additionalProperties" in schema:
        problems.append(f"{where}: both properties and additionalProperties")
    unconstrained = "properties" not in schema and "additionalProperties" not in schema
    if schema.get("type") == "object" and not root and not preserves and unconstrained:
        problems.append(f"{where}: an object with no properties prunes every field")
    problems += _junctor_violations(schema, where, int_or_string)
    problems += _list_map_violations(schema, where)
    problems += _validation_rule_violations(schema, where)
    if "default" in schema:
        problems += _default_violations(schema, where)
    for name, child in (schema.get("properties") or {}).items():
        child_path = f"{path}.{name}"
        if root and name == "metadata":
            problems += _metadata_violations(child, child_path)
            continue
        problems += structural_violations(child, child_path, root=False)
    if isinstance(schema.get("additionalProperties"), dict):
        problems += structural_violations(schema["additionalProperties"], f"{path}.*", root=False)
    if "items" in schema:
        problems += structural_violations(schema["items"], f"{path}[]", root=False)
    return problems


def _junctor_violations(schema: dict[str, Any], where: str, int_or_string: bool) -> list[str]:
    problems = []
    for junctor in JUNCTORS:
        if junctor not in schema:
            continue
        branches = schema[junctor] if isinstance(schema[junctor], list) else [schema[junctor]]
        if int_or_string and junctor in ("anyOf", "allOf") and branches == INT_OR_STRING:
            continue  # the one form the API server allows
        for branch in branches:
            for key in NOT_IN_JUNCTORS:
                if key in branch:
                    problems.append(f"{where}: {key} inside {junctor}")
            for name in branch.get("properties") or {}:
                if name not in (schema.get("properties") or {}):
                    problems.append(f"{where}: {junctor} names property {name} the schema does not specify")
    return problems


def _metadata_violations(schema: dict[str, Any], where: str) -> list[str]:
    problems = [f"{where}: restricts {key}" for key in schema if key not in ("type", "properties")]
    if schema.get("type") != "object":
        problems.append(f"{where}: must be of type object")
    problems += [
        f"{where}.{name}: only name and generateName may be restricted"
        for name in schema.get("properties") or {}
        if name not in ("name", "generateName")
    ]
    return problems


def _list_map_violations(schema: dict[str, Any], where: str) -> list[str]:
    if schema.get("x-kubernetes-list-type") != "map":
        return []
    items = schema.get("items") or {}
    keys = schema.get("x-kubernetes-list-map-keys") or []
    if items.get("type") != "object" or not keys:
        return [f"{where}: a map list needs object items and x-kubernetes-list-map-keys"]
    problems = []
    for key in keys:
        key_schema = (items.get("properties") or {}).get(key)
        if key_schema is None or key_schema.get("type") not in ("string", "integer", "boolean"):
            problems.append(f"{where}: map key {key} must be a scalar property of the items")
        elif key not in items.get("required", []) and "default" not in key_schema:
            problems.append(f"{where}: map key {key} must be required or defaulted")
    return problems


def _validation_rule_violations(schema: dict[str, Any], where: str) -> list[str]:
    return [
        f"{where}: a CEL rule needs a rule and a one-line message"
        for rule in schema.get("x-kubernetes-validations") or []
        if not rule.get("rule") or "\n" in rule.get("message", "\n")
    ]


def _default_violations(schema: dict[str, Any], where: str) -> list[str]:
    default = apply_defaults(schema, copy.deepcopy(schema["default"]))
    try:
        jsonschema.validate(default, schema)
    except jsonschema.ValidationError as exc:
        return [f"{where}: default {schema['default']!r} is invalid: {exc.message}"]
    unknown = set(default) - set(schema.get("properties") or {}) if isinstance(default, dict) else set()
    if unknown and "additionalProperties" not in schema:
        return [f"{where}: default sets fields the schema prunes: {sorted(unknown)}"]
    return []


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """The API server's defaulting: a missing field with a default gets it, then its own fields are defaulted."""
    if isinstance(value, dict):
        value = dict(value)
        for name, child in (schema.get("properties") or {}).items():
            if name not in value and "default" in child:
                value[name] = copy.deepcopy(child["default"])
            if name in value:
                value[name] = apply_defaults(child, value[name])
        if isinstance(schema.get("additionalProperties"), dict):
            for name in set(value) - set(schema.get("properties") or {}):
                value[name] = apply_defaults(schema["additionalProperties"], value[name])
    elif isinstance(value, list) and "items" in schema:
        value = [apply_defaults(schema["items"], item) for item in value]
    return value


def test_the_crd_schema_is_structural() -> None:
    assert structural_violations(crd_schema()) == []


def test_the_crd_has_status_printer_columns_and_cel_rules() -> None:
    (version,) = crd()["spec"]["versions"]
    schema = crd_schema()["properties"]["spec"]["properties"]

    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Ready",
        "Router",
        "Prefill",
        "Decode",
        "Colocated",
        "Reason",
        "Age",
    ]
    for pool in ("router", "prefill", "decode", "colocated"):
        rules = [r["rule"] for r in schema[pool]["x-kubernetes-validations"]]
        assert "!(has(self.replicas) && has(self.autoscaling))" in rules
        autoscaling_rules = [
            r["rule"] for r in schema[pool]["properties"]["autoscaling"]["x-kubernetes-validations"]
        ]
        assert "self.minReplicas <= self.maxReplicas" in autoscaling_rules


BROKEN_SCHEMAS = [
    ({"type": "object", "properties": {"a": {"description": "untyped"}}}, ".a: no type"),
    (
        {
            "type": "object",
            "properties": {"metadata": {"type": "object", "properties": {"labels": {"type": "object"}}}},
        },
        ".metadata.labels: only name and generateName may be restricted",
    ),
    (
        {"type": "object", "properties": {"a": {"type": "string", "anyOf": [{"type": "string"}]}}},
        ".a: type inside anyOf",
    ),
    (
        {"type": "object", "properties": {"a": {"x-kubernetes-int-or-string": True, "type": "string"}}},
        ".a: x-kubernetes-int-or-string must not set a type",
    ),
    (
        {
            "type": "object",
            "properties": {"a": {"type": "object", "properties": {}, "additionalProperties": {}}},
        },
        ".a: both properties and additionalProperties",
    ),
    (
        {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "default": -1}}},
        ".a: default -1 is invalid",
    ),
    (
        {"type": "object", "properties": {"a": {"type": "object", "properties": {}, "default": {"b": 1}}}},
        ".a: default sets fields the schema prunes",
    ),
    (
        {
            "type": "object",
            "properties": {
                "c": {
                    "type": "array",
                    "x-kubernetes-list-type": "map",
                    "x-kubernetes-list-map-keys": ["type"],
                    "items": {"type": "object", "properties": {"type": {"type": "string"}}},
                }
            },
        },
        ".c: map key type must be required or defaulted",
    ),
]


@pytest.mark.parametrize(("schema", "problem"), BROKEN_SCHEMAS, ids=[p for _, p in BROKEN_SCHEMAS])
def test_the_structural_checker_catches_each_rule(schema: dict[str, Any], problem: str) -> None:
    assert any(found.startswith(problem) for found in structural_violations(schema)), structural_violations(
        schema
    )


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_crd_defaults_agree_with_the_operator(example: Path) -> None:
    """What the API server stores (the CR with the CRD's defaults) parses to the same spec as the CR as written."""
    (document,) = load_documents(example)
    schema = crd_schema()
    stored = apply_defaults(schema, document)

    jsonschema.validate(stored, schema)
    assert parse_spec(stored["spec"]) == parse_spec(document["spec"])


@pytest.mark.parametrize(
    "colocated",
    [
        {"replicas": 2, "machineType": "dgx-a100", "gpus": 1},
        {"autoscaling": {"maxReplicas": 3}, "resources": {"requests": {"cpu": 1}}},
    ],
    ids=["replicas", "autoscaling"],
)
def test_a_colocated_pool_fits_the_schema_and_renders_valid_kubernetes(colocated: dict[str, Any]) -> None:
    (document,) = load_documents(K8S / "examples" / "cpu-demo.yaml")
    document["spec"]["colocated"] = colocated
    schema = crd_schema()
    stored = apply_defaults(schema, copy.deepcopy(document))

    jsonschema.validate(stored, schema)
    assert parse_spec(stored["spec"]) == parse_spec(document["spec"])
    objects = render("demo", "team-a", stored["spec"])
    assert any(o["metadata"]["name"] == "demo-colocated" for o in objects)
    assert_valid(objects, "render(cpu-demo + colocated)")


def test_an_absent_colocated_pool_stays_absent_in_stored_resources() -> None:
    (document,) = load_documents(K8S / "examples" / "cpu-demo.yaml")

    assert "colocated" not in apply_defaults(crd_schema(), document)["spec"]


def test_the_schema_rejects_what_it_can_check_without_cel() -> None:
    schema = crd_schema()
    (document,) = load_documents(K8S / "examples" / "cpu-demo.yaml")
    for path, value in ((("decode", "replicas"), -1), (("kvTransfer", "backend"), "mooncake")):
        bad = copy.deepcopy(document)
        bad["spec"].setdefault(path[0], {})[path[1]] = value
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(apply_defaults(schema, bad), schema)


def test_the_operator_needs_a_scope(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["operator"]) == 2
    assert capsys.readouterr().err == (
        "splitserve operator: error: give --namespace NS (repeatable) or --all-namespaces\n"
    )
