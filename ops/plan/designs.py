"""Cluster designs the planner sizes, and one sized configuration of a design.

A design fixes machine types: a prefill pool and a decode pool (Splitwise's phase-split designs) or one colocated
pool (the baselines). The planner only chooses how many machines each pool gets. Built-in designs come from the
simulator's DESIGNS table; users add their own as NAME=PREFILL_TYPE:DECODE_TYPE or NAME=TYPE (colocated), with
types from the machine catalog.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cluster.machines import MachineType
from ops.plan.pricing import catalog_entry

BASELINE_A100 = "baseline-a100"  # the design every ratio is taken against, as in the paper


@dataclass(frozen=True, slots=True)
class DesignSpec:
    name: str
    prefill_type: str | None = None  # machine type of the prefill pool; None for a colocated design
    decode_type: str | None = None
    colocated_type: str | None = None  # machine type of the only pool of a colocated design

    def __post_init__(self) -> None:
        split = self.prefill_type is not None and self.decode_type is not None
        colocated = self.colocated_type is not None
        half_split = (self.prefill_type is None) != (self.decode_type is None)
        if half_split or split == colocated:
            raise ValueError(
                f"design {self.name!r} needs either a prefill and a decode machine type or one colocated type"
            )

    @property
    def is_split(self) -> bool:
        return self.colocated_type is None

    def machine_types(self) -> tuple[str, ...]:
        types = (self.prefill_type, self.decode_type, self.colocated_type)
        return tuple(t for t in types if t is not None)

    def describe(self) -> str:
        if self.is_split:
            return f"prefill {self.prefill_type}, decode {self.decode_type}"
        return f"colocated {self.colocated_type}"


@dataclass(frozen=True, slots=True, order=True)
class Config:
    """One sized design: machines per pool (0 for the pools a design does not have)."""

    design: str
    prefill: int = 0
    decode: int = 0
    colocated: int = 0

    def machines(self) -> int:
        return self.prefill + self.decode + self.colocated

    def label(self) -> str:
        return f"{self.prefill}x{self.decode}" if self.colocated == 0 else f"{self.colocated} colocated"


def resolve_designs(
    names: Sequence[str],
    custom: Sequence[str],
    builtin: Mapping[str, tuple[str | None, str | None, str | None]],
    catalog: Mapping[str, MachineType],
) -> list[DesignSpec]:
    """The built-in designs named, then the custom ones, each checked against the catalog.

    ValueError, one line, for an unknown design or machine type, a malformed custom entry or a duplicate name."""
    specs: list[DesignSpec] = []
    for name in names:
        if name not in builtin:
            raise ValueError(
                f"unknown design {name!r}; known: {', '.join(builtin)} (or add one with --custom)"
            )
        prefill, decode, colocated = builtin[name]
        specs.append(DesignSpec(name, prefill, decode, colocated))
    specs.extend(parse_custom_design(text) for text in custom)
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ValueError(f"design {spec.name!r} is given twice")
        seen.add(spec.name)
        for machine_type in spec.machine_types():
            catalog_entry(catalog, machine_type)
    if not specs:
        raise ValueError("no design to plan; name at least one with --design or --custom")
    return specs


def parse_custom_design(text: str) -> DesignSpec:
    """NAME=PREFILL_TYPE:DECODE_TYPE (phase-split) or NAME=TYPE (colocated)."""
    name, sep, types = text.partition("=")
    parts = types.split(":")
    if not sep or not name.strip() or len(parts) > 2 or not all(p.strip() for p in parts):
        raise ValueError(
            f"--custom {text!r}: expected NAME=PREFILL_TYPE:DECODE_TYPE or NAME=TYPE (colocated), "
            "e.g. my-ha=dgx-h100:dgx-a100"
        )
    if len(parts) == 1:
        return DesignSpec(name.strip(), colocated_type=parts[0].strip())
    return DesignSpec(name.strip(), prefill_type=parts[0].strip(), decode_type=parts[1].strip())
