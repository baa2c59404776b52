"""Budgets (iso-power in W, iso-cost in $/h) and the configurations a budget allows.

A budget is written as a number (W or $/h) or as machines, "40xdgx-h100" or "25xdgx-h100+26xdgx-a100", priced
with the same table as the configurations, so "40xdgx-h100" means the same thing under either power basis.

More machines never lower the load a configuration sustains, so under a budget only its frontier matters: for each
prefill pool size, the largest decode pool that still fits (a colocated design has a single frontier point).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from ops.plan.designs import Config, DesignSpec
from ops.plan.pricing import MachinePrice

SpendKind = Literal["power", "cost"]
SPEND_UNITS: dict[SpendKind, str] = {"power": "W", "cost": "$/h"}
# The paper's iso budget (splitwise-facts.md line 66: "40 DGX-H100 = 70 DGX-A100").
PAPER_BUDGET = "40xdgx-h100"
# A configuration "fits" when it is within this relative slack of the budget: budgets written as machines are
# sums of floats, and 70 x 24.8 units must fit a budget of 70 x 24.8 units.
_FIT_SLACK = 1e-9
_TERM = re.compile(r"\s*(\d+)\s*[x*]\s*([A-Za-z0-9._-]+)\s*")


@dataclass(frozen=True, slots=True)
class Budget:
    kind: SpendKind
    limit: float  # W for power, $/h for cost
    text: str  # as the user wrote it, for reports

    def __post_init__(self) -> None:
        if not (math.isfinite(self.limit) and self.limit > 0):
            raise ValueError(f"a {self.kind} budget must be a finite number > 0, got {self.limit!r}")

    def describe(self) -> str:
        amount = f"{self.limit / 1000:.1f} kW" if self.kind == "power" else f"${self.limit:,.1f}/h"
        return amount if self.text == _plain(self.limit) else f"{amount} ({self.text})"

    def allows(self, spend_value: float) -> bool:
        return spend_value <= self.limit * (1 + _FIT_SLACK)


def parse_budget(text: str, kind: SpendKind, prices: Mapping[str, MachinePrice]) -> Budget:
    """A number in W or $/h, or a '+'-separated sum of COUNTxTYPE terms priced with `prices`."""
    stripped = text.strip()
    try:
        return Budget(kind, float(stripped), stripped)
    except ValueError as exc:
        if _is_number(stripped):
            raise ValueError(f"budget {text!r}: {exc}") from None
    total = 0.0
    for term in stripped.split("+"):
        match = _TERM.fullmatch(term)
        if match is None:
            raise ValueError(
                f"budget {text!r}: expected a number ({SPEND_UNITS[kind]}) or machines like 40xdgx-h100"
            )
        count, machine_type = int(match.group(1)), match.group(2)
        if machine_type not in prices:
            raise ValueError(f"budget {text!r}: unknown machine type {machine_type!r}")
        total += count * unit_spend(prices[machine_type], kind)
    return Budget(kind, total, stripped)


def unit_spend(price: MachinePrice, kind: SpendKind) -> float:
    return price.power_w if kind == "power" else price.cost_per_hour


def spend(spec: DesignSpec, config: Config, prices: Mapping[str, MachinePrice], kind: SpendKind) -> float:
    total = 0.0
    for machine_type, count in (
        (spec.prefill_type, config.prefill),
        (spec.decode_type, config.decode),
        (spec.colocated_type, config.colocated),
    ):
        if machine_type is not None and count:
            total += count * unit_spend(prices[machine_type], kind)
    return total


def frontier(spec: DesignSpec, budget: Budget, prices: Mapping[str, MachinePrice]) -> list[Config]:
    """Every configuration with at least one machine per pool that fits, and no machine could be added to.

    Ordered by prefill pool size; empty when not even one machine per pool fits."""
    if spec.colocated_type is not None:
        count = _fitting(budget.limit, _unit(spec.colocated_type, prices, budget.kind))
        return [Config(spec.name, colocated=count)] if count >= 1 else []
    assert spec.prefill_type is not None and spec.decode_type is not None
    prefill_unit = _unit(spec.prefill_type, prices, budget.kind)
    decode_unit = _unit(spec.decode_type, prices, budget.kind)
    configs: list[Config] = []
    prefill = 1
    while budget.allows(prefill * prefill_unit + decode_unit):
        decode = _fitting(budget.limit - prefill * prefill_unit, decode_unit)
        configs.append(Config(spec.name, prefill=prefill, decode=decode))
        prefill += 1
    return configs


def _unit(machine_type: str, prices: Mapping[str, MachinePrice], kind: SpendKind) -> float:
    unit = unit_spend(prices[machine_type], kind)
    if unit <= 0:
        raise ValueError(
            f"{machine_type!r} has no {kind} to count against the budget: the search is unbounded"
        )
    return unit


def _fitting(limit: float, unit: float) -> int:
    """How many machines of `unit` spend fit in `limit` (the slack absorbs float rounding)."""
    return math.floor((limit + abs(limit) * _FIT_SLACK + unit * _FIT_SLACK) / unit)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _plain(value: float) -> str:
    return f"{value:g}"
