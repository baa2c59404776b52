"""`splitserve operator`: run the operator, or print what it would create (the CRD, or a cluster's objects).

splitserve operator --all-namespaces            watch SplitserveClusters everywhere (in-cluster or kubeconfig)
splitserve operator --namespace team-a          one namespace (repeatable)
splitserve operator --print-crd                 the CRD as YAML (k8s/crd/ is generated with this)
splitserve operator --render cluster.yaml       the objects of a SplitserveCluster, for `kubectl apply -f -`
                                                without the operator (no ownerReferences, managed-by kubectl)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from ops.operator.labels import KIND, MANAGED_BY

EXIT_USAGE = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace", action="append", default=[], metavar="NS", help="watch this namespace (repeatable)"
    )
    scope.add_argument("--all-namespaces", action="store_true", help="watch every namespace")
    parser.add_argument(
        "--health-port", type=int, default=0, help="serve kopf's liveness probe at :PORT/healthz (0: off)"
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument(
        "--print-crd", action="store_true", help="print the SplitserveCluster CRD as YAML and exit"
    )
    output.add_argument(
        "--render",
        type=Path,
        metavar="FILE",
        help="print the objects for the SplitserveCluster in FILE and exit",
    )
    parser.add_argument(
        "--render-namespace",
        default=None,
        help="--render: the namespace to put in the objects (default: the file's, else none)",
    )


def main(args: argparse.Namespace) -> int:
    if args.print_crd:
        from ops.operator.crd import crd

        sys.stdout.write(to_yaml([crd()]))
        return 0
    if args.render is not None:
        return _print_rendered(args.render, args.render_namespace)
    if not args.namespace and not args.all_namespaces:
        return _usage_error("give --namespace NS (repeatable) or --all-namespaces")
    return _run_operator(args)


def to_yaml(objects: list[dict[str, Any]]) -> str:
    """Objects as one multi-document YAML stream, keys in the order render() wrote them."""
    return yaml.safe_dump_all(objects, sort_keys=False, default_flow_style=False, width=120)


def standalone_objects(document: dict[str, Any], namespace: str | None) -> list[dict[str, Any]]:
    """render() of a SplitserveCluster document, labelled as applied by hand rather than by the operator."""
    from ops.operator.render import render
    from ops.operator.spec import SpecError

    if not isinstance(document, dict) or document.get("kind") != KIND:
        raise SpecError(
            f"expected a {KIND} document, got {type(document).__name__} of kind "
            f"{document.get('kind') if isinstance(document, dict) else None!r}"
        )
    meta = document.get("metadata") or {}
    name = meta.get("name")
    if not isinstance(name, str):
        raise SpecError("metadata.name: is required")
    chosen = namespace if namespace is not None else meta.get("namespace", "")
    objects = render(name, chosen, document.get("spec") or {})
    for body in objects:
        body["metadata"]["labels"][MANAGED_BY] = (
            "kubectl"  # keeps a later operator's pruning off these objects
        )
        if not chosen:
            del body["metadata"]["namespace"]  # left to `kubectl -n` or kustomize
    return objects


def _print_rendered(path: Path, namespace: str | None) -> int:
    from ops.operator.spec import SpecError

    try:
        document = yaml.safe_load(path.read_text())
        objects = standalone_objects(document, namespace)
    except (OSError, yaml.YAMLError) as exc:
        return _usage_error(f"cannot read {path}: {' '.join(str(exc).split())}")
    except SpecError as exc:
        return _usage_error(f"{path}: {exc}")
    sys.stdout.write(to_yaml(objects))
    return 0


def _run_operator(args: argparse.Namespace) -> int:
    import kopf

    from ops.operator.handlers import registry

    liveness = f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None
    kopf.configure(verbose=False)
    # standalone: no peering objects; run one replica (the Deployment in k8s/operator/ does).
    kopf.run(
        registry=registry,
        standalone=True,
        clusterwide=args.all_namespaces,
        namespaces=args.namespace,
        liveness_endpoint=liveness,
    )
    return 0


def _usage_error(message: str) -> int:
    print(f"splitserve operator: error: {message}", file=sys.stderr)
    return EXIT_USAGE
