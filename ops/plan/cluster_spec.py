"""`splitserve plan --cluster-out`: the SplitserveCluster that runs the configuration the plan chose.

The plan sizes machines per pool; the operator runs pods per pool. One planned machine is one pod: the prefill
and decode pools get the chosen (#prefill, #decode) as replicas, the design's machine types (the nodes' price and
power model) and, unless a template says otherwise, the machine type's GPU count per pod (a DGX: 8).

With --cluster-template (an existing SplitserveCluster) everything else comes from the template; without one the
spec is a minimal one whose model volume is a placeholder to edit. The written object is parsed and rendered by
the operator's own code first, so what lands on disk is one the operator accepts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cluster.machines import MachineType
from ops.operator.labels import GROUP, KIND, VERSION
from ops.operator.render import render
from ops.operator.spec import NODE_POOLS, check_cluster_name, parse_spec
from ops.plan.budget import spend
from ops.plan.designs import DesignSpec
from ops.plan.outcome import GOAL_SPEND, DesignPlan, maximises_throughput
from ops.plan.planner import PlanResult

API_VERSION = f"{GROUP}/{VERSION}"
# Without a template the model volume is unknown: a PVC of this name, which the header comment says to edit.
PLACEHOLDER_PVC = "models"
# render() needs a namespace; the objects are only checked, never applied, so any valid one will do.
CHECK_NAMESPACE = "default"


@dataclass(frozen=True, slots=True)
class ClusterOutput:
    """What --cluster-out asked for, checked before the plan runs so that bad input fails in seconds."""

    path: Path
    name: str | None  # --cluster-name; None: the template's name, else the design's
    design: str | None  # --cluster-design; None: the best phase-split design of the plan
    template: dict[str, Any] | None
    catalog: dict[str, MachineType]
    policy: str
    policy_options: dict[str, str]
    model: str  # the perf model's model name, the placeholder spec.model.name

    def write(self, result: PlanResult) -> str | None:
        """Writes the cluster of the chosen design's answer; the reason nothing was written, if so.

        ValueError (one line) when the object would not pass the operator's checks."""
        plan = self._chosen(result)
        if plan is None or plan.best is None:
            which = f"design {self.design}" if self.design else "any phase-split design"
            return f"no feasible configuration for {which}"
        document = self.document(plan)
        try:
            check_document(document)
        except ValueError as exc:
            named_by_design = not (self.name or self.template) and str(exc).startswith("metadata.name")
            hint = " (name it with --cluster-name)" if named_by_design else ""
            raise ValueError(
                f"--cluster-out: the {KIND} for {plan.spec.name} does not check: {exc}{hint}"
            ) from exc
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(_header(result, plan) + yaml.safe_dump(document, sort_keys=False, width=120))
        return None

    def document(self, plan: DesignPlan) -> dict[str, Any]:
        """The SplitserveCluster object for a design's chosen configuration."""
        assert plan.best is not None and plan.spec.is_split
        document = copy.deepcopy(self.template) if self.template is not None else self._minimal()
        metadata = document.setdefault("metadata", {})
        metadata["name"] = self.name or metadata.get("name") or plan.spec.name
        spec = document.setdefault("spec", {})
        config = plan.best.config
        sizes = {"prefill": config.prefill, "decode": config.decode}
        types = {"prefill": plan.spec.prefill_type, "decode": plan.spec.decode_type}
        for role in NODE_POOLS:
            kept = {
                key: value
                for key, value in (spec.get(role) or {}).items()
                # replicas XOR autoscaling: the plan's count replaces an autoscaler's range
                if key not in ("replicas", "autoscaling", "machineType")
            }
            pool = {"replicas": sizes[role], "machineType": types[role], **kept}
            # A template that sets gpus knows how many devices one pod uses; otherwise a pod is a whole machine.
            pool.setdefault("gpus", self.catalog[str(types[role])].gpus)
            spec[role] = pool
        return document

    def _minimal(self) -> dict[str, Any]:
        router: dict[str, Any] = {"replicas": 1, "policy": self.policy}
        if self.policy_options:
            router["policyOptions"] = dict(self.policy_options)
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {},
            "spec": {"model": {"name": self.model, "pvcName": PLACEHOLDER_PVC}, "router": router},
        }

    def _chosen(self, result: PlanResult) -> DesignPlan | None:
        split = [plan for plan in result.designs if plan.spec.is_split]
        if self.design is not None:
            return next(plan for plan in split if plan.spec.name == self.design)
        return best_split_plan(result, split)


def prepare(args: Any, specs: list[DesignSpec], catalog: dict[str, MachineType]) -> ClusterOutput | None:
    """The --cluster-* flags checked (None when --cluster-out is not given); ValueError, one line, if bad.

    Call it after the policy options are parsed (shared_config): they are copied as the text the user gave."""
    if args.cluster_out is None:
        for flag in ("cluster_name", "cluster_design", "cluster_template"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} needs --cluster-out")
        return None
    if args.cluster_design is not None:
        split = [spec.name for spec in specs if spec.is_split]
        if args.cluster_design not in split:
            raise ValueError(
                f"--cluster-design {args.cluster_design!r} is not a phase-split design of this plan "
                f"(a SplitserveCluster has prefill and decode pools); planned: {', '.join(split) or 'none'}"
            )
    elif not any(spec.is_split for spec in specs):
        raise ValueError(
            "--cluster-out needs a phase-split design in the plan; only colocated ones are planned"
        )
    if args.cluster_name is not None:
        check_cluster_name(args.cluster_name)
    template = None if args.cluster_template is None else load_template(args.cluster_template)
    return ClusterOutput(
        path=args.cluster_out,
        name=args.cluster_name,
        design=args.cluster_design,
        template=template,
        catalog=catalog,
        policy=args.policy,
        policy_options={key: text for key, _, text in (item.partition("=") for item in args.policy_option)},
        model=args.model,
    )


def load_template(path: Path) -> dict[str, Any]:
    """A SplitserveCluster YAML document that the operator accepts; ValueError, one line, otherwise."""
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"--cluster-template: cannot read {path}: {exc}") from exc
    if not isinstance(document, dict) or document.get("kind") != KIND:
        raise ValueError(f"--cluster-template: {path} is not a {KIND} document")
    metadata = document.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"--cluster-template: {path}: metadata: expected a mapping")
    try:
        # A template may leave the name to --cluster-name or the design; the written object is checked in full.
        check_document({**document, "metadata": {"name": "template", **metadata}})
    except ValueError as exc:
        raise ValueError(f"--cluster-template: {path}: {exc}") from exc
    return document


def check_document(document: dict[str, Any]) -> None:
    """parse_spec and render() of the object, as the operator will; their SpecError (a ValueError) if either fails."""
    metadata = document.get("metadata") or {}
    spec = parse_spec(document.get("spec") or {})
    render(str(metadata.get("name")), metadata.get("namespace") or CHECK_NAMESPACE, spec)


def best_split_plan(result: PlanResult, split: list[DesignPlan]) -> DesignPlan | None:
    """The phase-split design whose answer best serves the goal: the highest rate within the budget (iso goals) or
    the lowest power or cost at the target (min goals); the first in plan order on ties."""
    feasible = [plan for plan in split if plan.best is not None]
    if not feasible:
        return None
    request = result.request
    if maximises_throughput(request.goal):
        return max(feasible, key=lambda plan: plan.best.rps if plan.best else 0.0)
    kind = GOAL_SPEND[request.goal]
    return min(
        feasible,
        key=lambda plan: spend(plan.spec, plan.best.config, request.prices, kind) if plan.best else 0.0,
    )


def _header(result: PlanResult, plan: DesignPlan) -> str:
    assert plan.best is not None
    best, request = plan.best, result.request
    power_kw = spend(plan.spec, best.config, request.prices, "power") / 1000
    cost = spend(plan.spec, best.config, request.prices, "cost")
    rate = "max" if maximises_throughput(request.goal) else "target"
    return (
        f"# Written by `splitserve plan --goal {request.goal}`: design {plan.spec.name} ({plan.spec.describe()}),\n"
        f"# {best.config.prefill} prefill x {best.config.decode} decode machines, {rate} {best.rps:.2f} req/s "
        f"within all 9 SLOs, {power_kw:,.1f} kW, ${cost:,.2f}/h.\n"
        "# Check spec.model (the model and its volume) before applying.\n"
    )
