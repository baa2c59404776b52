"""What one machine of each type counts against a budget: its power (W) and its price ($/h).

Two power bases:
  rated  the catalog's maximum draw (cluster/machines.py: the cap when capped, else the rating). What a user with a
         real rack budgets with, and the default.
  paper  the Splitwise simulator's normalised machine power (splitwise-facts.md line 23: "power A100 24.8, H100 44,
         capped H100 30.8"), converted to watts by pinning one DGX-A100 at its catalog rating. The catalog's DGX
         ratings put an H100 machine at 1.57x an A100 one (10200 / 6500 W), the paper's constants at 1.77x, so
         only this basis makes "40 DGX-H100 = 70 DGX-A100" (line 66) hold and puts the paper's iso-power splits
         on the budget frontier. It knows the three built-in DGX types only.
Prices always come from the catalog (line 22: $17.6/h and $38/h per 8-GPU machine).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from cluster.machines import MachineType

PowerBasis = Literal["rated", "paper"]
POWER_BASES: tuple[PowerBasis, ...] = ("rated", "paper")

# splitwise-facts.md line 23, in the simulator's normalised units; only ratios matter.
PAPER_RELATIVE_POWER = {"dgx-a100": 24.8, "dgx-h100": 44.0, "dgx-h100-cap": 30.8}
PAPER_POWER_ANCHOR = "dgx-a100"  # the type whose catalog rating fixes the unit


@dataclass(frozen=True, slots=True)
class MachinePrice:
    power_w: float  # counted against an iso-power budget or minimised by the min-power goal
    cost_per_hour: float  # counted against an iso-cost budget or minimised by the min-cost goal


def price_table(
    catalog: Mapping[str, MachineType], machine_types: Iterable[str], basis: PowerBasis
) -> dict[str, MachinePrice]:
    """MachinePrice per machine type; ValueError for an unknown type or one the basis cannot price."""
    if basis not in POWER_BASES:
        raise ValueError(f"unknown power basis {basis!r}; known: {', '.join(POWER_BASES)}")
    table: dict[str, MachinePrice] = {}
    for name in machine_types:
        machine = catalog_entry(catalog, name)
        table[name] = MachinePrice(_power_w(catalog, machine, basis), machine.cost_per_hour)
    return table


def catalog_entry(catalog: Mapping[str, MachineType], name: str) -> MachineType:
    if name not in catalog:
        raise ValueError(f"unknown machine type {name!r}; known: {', '.join(sorted(catalog))}")
    return catalog[name]


def _power_w(catalog: Mapping[str, MachineType], machine: MachineType, basis: PowerBasis) -> float:
    if basis == "rated":
        return machine.max_power_w
    if machine.name not in PAPER_RELATIVE_POWER or PAPER_POWER_ANCHOR not in catalog:
        known = ", ".join(PAPER_RELATIVE_POWER)
        raise ValueError(
            f"power basis 'paper' knows only {known}; use --power-basis rated for {machine.name!r}"
        )
    watts_per_unit = catalog[PAPER_POWER_ANCHOR].max_power_w / PAPER_RELATIVE_POWER[PAPER_POWER_ANCHOR]
    return PAPER_RELATIVE_POWER[machine.name] * watts_per_unit
