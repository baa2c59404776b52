"""The placement policies by name: what `--policy NAME --policy-option KEY=VALUE` builds, for the router, `up`,
the simulator and the planner alike. Kept apart from router/policy.py (the types every policy implements) so the
policies import those types and this registry imports the policies, with no circle.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from router.cost_policy import CostPolicy
from router.kv_policy import KVAware
from router.mixed_pool import MixedPool
from router.policy import JoinShortestQueue, PlacementPolicy
from router.power_policy import PowerPolicy


def policy_names() -> list[str]:
    return sorted(_factories())


def _factories() -> dict[str, Callable[..., PlacementPolicy]]:
    return {
        "jsq": JoinShortestQueue,
        "kv": KVAware,
        "cost": CostPolicy,
        "power": PowerPolicy,
        "mixed": _mixed_pool,
    }


def _mixed_pool(inner: str = "jsq", **options: Any) -> MixedPool:
    """Splitwise's mixed pool around the policy named `inner`; options other than its thresholds go to `inner`."""
    if inner == "mixed":
        raise ValueError("the mixed pool wraps another policy, not itself")
    thresholds = {key: options.pop(key) for key in ("prompt_threshold", "token_threshold") if key in options}
    return MixedPool(create_policy(inner, **options), **thresholds)


def create_policy(name: str, **options: Any) -> PlacementPolicy:
    """The policy called `name`, built with its keyword options; ValueError for an unknown name or bad option."""
    factories = _factories()
    if name not in factories:
        raise ValueError(f"unknown placement policy {name!r} (known: {', '.join(sorted(factories))})")
    try:
        return factories[name](**options)
    except TypeError as exc:
        raise ValueError(f"placement policy {name!r}: {exc}") from None


def parse_policy_options(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE strings to keyword options; a value is read as JSON (numbers, true/false) or else kept as text."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"policy option {item!r} is not KEY=VALUE")
        try:
            options[key] = json.loads(text)
        except ValueError:
            options[key] = text
    return options


def add_policy_arguments(group: argparse._ActionsContainer) -> None:
    """--policy and --policy-option, for every command that places requests (router, up, simulate, plan)."""
    group.add_argument(
        "--policy",
        default="jsq",
        help="jsq (default), kv (where the prompt's KV is cached), cost, power or mixed (Splitwise's mixed pool "
        "around --policy-option inner=NAME)",
    )
    group.add_argument(
        "--policy-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a keyword option of the policy, e.g. budget_w=50000 (power) or inner=cost (mixed); repeatable",
    )
