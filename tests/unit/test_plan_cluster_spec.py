"""`splitserve plan --cluster-out`: real plans of a 200-request conv.csv slice, the YAML checked by the operator's code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.machines import BUILTIN_MACHINES
from ops.cli import main
from ops.operator.render import render
from ops.operator.spec import parse_spec
from ops.sim import DESIGNS

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
CONV = DATA / "azure-llm-inference-2023" / "conv.csv"
PERF = DATA / "splitwise-perf-model" / "perf_model.csv"
GPU_EXAMPLE = REPO / "k8s" / "examples" / "gpu.yaml"
CPU_EXAMPLE = REPO / "k8s" / "examples" / "cpu-demo.yaml"
BASE = ["plan", "--trace", str(CONV), "--perf-model", str(PERF), "--limit", "200", "--rate-tolerance", "0.2"]
BASE += ["--quiet", "--paper-trace", "none"]


def plan(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main([*BASE, *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def load(path: Path) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text())
    assert isinstance(document, dict)
    return document


def deployments(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    name = document["metadata"]["name"]
    objects = render(name, "default", document["spec"])
    return {body["metadata"]["name"]: body for body in objects if body["kind"] == "Deployment"}


def gpu_limit(deployment: dict[str, Any]) -> str | None:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    limits: dict[str, str] = container.get("resources", {}).get("limits", {})
    return limits.get("nvidia.com/gpu")


def test_the_cluster_runs_the_best_split_designs_answer(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    designs = ["--design", "baseline-a100", "--design", "splitwise-aa", "--design", "splitwise-hhcap"]
    code, out, err = plan(capsys, *designs, "--budget", "6xdgx-h100", "--output", str(tmp_path / "plan.json"),
                          "--cluster-out", str(tmp_path / "cluster.yaml"))  # fmt: skip
    assert code == 0, err
    assert f"SplitserveCluster written to {tmp_path / 'cluster.yaml'}" in out
    answers = {d["design"]: d["best"] for d in json.loads((tmp_path / "plan.json").read_text())["designs"]}
    split = {name: best for name, best in answers.items() if best is not None and best["colocated"] == 0}
    chosen = max(split, key=lambda name: split[name]["rps"])  # iso-power: the highest rate within the budget

    document = load(tmp_path / "cluster.yaml")
    assert document["kind"] == "SplitserveCluster" and document["metadata"]["name"] == chosen
    spec = parse_spec(document["spec"])
    prefill_type, decode_type, _ = DESIGNS[chosen]
    assert (spec.prefill.replicas, spec.decode.replicas) == (
        split[chosen]["prefill"],
        split[chosen]["decode"],
    )
    assert (spec.prefill.machine_type, spec.decode.machine_type) == (prefill_type, decode_type)
    assert spec.prefill.gpus == BUILTIN_MACHINES[str(prefill_type)].gpus == 8
    assert spec.decode.gpus == BUILTIN_MACHINES[str(decode_type)].gpus
    rendered = deployments(document)
    assert rendered[f"{chosen}-prefill"]["spec"]["replicas"] == split[chosen]["prefill"]
    assert rendered[f"{chosen}-decode"]["spec"]["replicas"] == split[chosen]["decode"]
    assert gpu_limit(rendered[f"{chosen}-decode"]) == "8"
    assert f"design {chosen}" in (tmp_path / "cluster.yaml").read_text().splitlines()[0]


def test_a_template_keeps_its_fields_and_loses_the_autoscaler(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out_path = tmp_path / "cluster.yaml"
    code, _, err = plan(capsys, "--design", "splitwise-hh", "--budget", "6xdgx-h100", "--cluster-out", str(out_path),
                        "--cluster-template", str(GPU_EXAMPLE), "--policy", "cost")  # fmt: skip
    assert code == 0, err
    template, written = load(GPU_EXAMPLE), load(out_path)
    assert written["metadata"] == template["metadata"]  # the template's name, as no --cluster-name was given
    for key in template["spec"].keys() - {"prefill", "decode"}:
        assert written["spec"][key] == template["spec"][key], key
    for role in ("prefill", "decode"):
        pool, original = written["spec"][role], template["spec"][role]
        assert pool["machineType"] == "dgx-h100" and pool["replicas"] >= 1
        assert "autoscaling" not in pool
        kept = original.keys() - {"replicas", "autoscaling", "machineType"}
        assert {key: pool[key] for key in kept} == {key: original[key] for key in kept}
    assert (
        "autoscaling" in template["spec"]["decode"]
    )  # the template's HPA range gave way to the plan's count
    assert written["spec"]["decode"]["gpus"] == 1  # the template says how many GPUs one pod uses
    rendered = deployments(written)
    assert rendered["llama-8b-decode"]["spec"]["replicas"] == written["spec"]["decode"]["replicas"]


def test_min_cost_names_the_design_and_the_cluster(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out_path = tmp_path / "cluster.yaml"
    code, _, err = plan(capsys, "--design", "splitwise-hh", "--design", "splitwise-aa", "--goal", "min-cost",
                        "--target-rps", "3", "--max-machines", "8", "--output", str(tmp_path / "plan.json"),
                        "--cluster-out", str(out_path), "--cluster-design", "splitwise-hh",
                        "--cluster-name", "hh", "--cluster-template", str(CPU_EXAMPLE))  # fmt: skip
    assert code == 0, err
    answers = {d["design"]: d["best"] for d in json.loads((tmp_path / "plan.json").read_text())["designs"]}
    spec = load(out_path)["spec"]
    assert load(out_path)["metadata"]["name"] == "hh"
    assert spec["prefill"]["replicas"] == answers["splitwise-hh"]["prefill"]
    assert spec["decode"]["replicas"] == answers["splitwise-hh"]["decode"]
    assert spec["prefill"]["gpus"] == 8  # the CPU template sets no gpus: a pod is a whole DGX
    assert spec["model"] == load(CPU_EXAMPLE)["spec"]["model"]


def test_min_power_picks_the_lowest_power_split_design(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = plan(capsys, "--design", "splitwise-hh", "--design", "splitwise-aa", "--goal", "min-power",
                        "--target-rps", "3", "--max-machines", "8", "--output", str(tmp_path / "plan.json"),
                        "--cluster-out", str(tmp_path / "cluster.yaml"))  # fmt: skip
    assert code == 0, err
    answers = {d["design"]: d["best"] for d in json.loads((tmp_path / "plan.json").read_text())["designs"]}
    cheapest = min(answers, key=lambda name: answers[name]["power_w"])
    written = load(tmp_path / "cluster.yaml")
    assert written["metadata"]["name"] == cheapest
    assert written["spec"]["prefill"]["replicas"] == answers[cheapest]["prefill"]


def test_no_feasible_configuration_writes_nothing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_path = tmp_path / "cluster.yaml"
    code, _, err = plan(
        capsys, "--design", "splitwise-hh", "--budget", "5000", "--cluster-out", str(out_path)
    )
    assert code == 3
    assert "not written: no feasible configuration" in err
    assert not out_path.exists()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("kind: Deployment\nmetadata: {name: x}\n", "is not a SplitserveCluster document"),
        (
            "kind: SplitserveCluster\nmetadata: {name: x}\nspec: {model: {name: m}}\n",
            "spec.model: set exactly one",
        ),
        (
            "kind: SplitserveCluster\nmetadata: {name: x}\nspec:\n  model: {name: m, demo: true}\n"
            "  prefill: {replicas: 1, autoscaling: {maxReplicas: 2}}\n",
            "spec.prefill: set replicas or autoscaling, not both",
        ),
        ("kind: [unclosed\n", "cannot read"),
    ],
)
def test_a_bad_template_is_one_line_and_exit_2_before_any_simulation(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, template: str, message: str
) -> None:
    out_path = tmp_path / "cluster.yaml"
    path = write(tmp_path / "template.yaml", template)
    code, out, err = plan(capsys, "--design", "splitwise-hh", "--budget", "6xdgx-h100", "--cluster-out",
                          str(out_path), "--cluster-template", str(path))  # fmt: skip
    assert code == 2
    assert err.startswith("splitserve plan: error: --cluster-template") and message in err
    assert len(err.strip().splitlines()) == 1 and out == ""  # nothing simulated, nothing printed
    assert not out_path.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cluster-design", "baseline-a100"], "is not a phase-split design of this plan"),
        (["--cluster-name", "Not_A_Label"], "metadata.name: must be a DNS label"),
    ],
)
def test_bad_cluster_flags_are_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str], message: str
) -> None:
    code, out, err = plan(capsys, "--design", "splitwise-hh", "--design", "baseline-a100", "--budget", "6xdgx-h100",
                          "--cluster-out", str(tmp_path / "cluster.yaml"), *args)  # fmt: skip
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and out == ""


def test_a_custom_machine_type_needs_a_template_with_a_machine_catalog(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    catalog = {"machines": [{"name": "my-box", "accelerator": "a100-80gb", "gpus": 16, "cost_per_hour": 10.0,
                             "rated_power_w": 3000.0}]}  # fmt: skip
    catalog_path = write(tmp_path / "catalog.json", json.dumps(catalog))
    out_path = tmp_path / "cluster.yaml"
    args = ["--machines", str(catalog_path), "--design", "splitwise-hh", "--custom", "hb=dgx-h100:my-box"]
    args += ["--budget", "6xdgx-h100", "--cluster-design", "hb"]
    code, _, err = plan(capsys, *args, "--cluster-out", str(out_path))
    assert code == 2 and "spec.decode.machineType: unknown machine type 'my-box'" in err
    assert len(err.strip().splitlines()) == 1 and not out_path.exists()

    template = load(CPU_EXAMPLE)
    template["spec"]["machineCatalog"] = {"configMapName": "my-machines"}
    del template["metadata"]  # the name then comes from the design
    template_path = write(tmp_path / "template.yaml", yaml.safe_dump(template))
    code, _, err = plan(
        capsys, *args, "--cluster-out", str(out_path), "--cluster-template", str(template_path)
    )
    assert code == 0, err
    written = load(out_path)
    assert written["spec"]["decode"]["machineType"] == "my-box" and written["metadata"]["name"] == "hb"
    assert written["spec"]["decode"]["gpus"] == 16  # the --machines catalog's GPU count
    assert deployments(written)["hb-decode"]["spec"]["replicas"] == written["spec"]["decode"]["replicas"]
