"""Cluster designs: which machine type serves which phase, and how many of each (Splitwise Table V).

A design has up to three pools: prefill (prompt phase), decode (token phase) and colocated (both phases on every
machine, the baseline). It is servable when it has a colocated pool or both a prefill and a decode pool. Pool
sizes are in machines; `ops/sim/nodes.py` turns a machine into one or more model instances.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cluster.machines import BUILTIN_MACHINES, MachineType

__all__ = ["DESIGNS", "ClusterDesign", "Pool", "machine_type", "make_design"]

# name -> (prefill type, decode type, colocated type); splitwise-facts.md, "Cluster designs (Table V)".
DESIGNS: dict[str, tuple[str | None, str | None, str | None]] = {
    "baseline-a100": (None, None, "dgx-a100"),
    "baseline-h100": (None, None, "dgx-h100"),
    "splitwise-aa": ("dgx-a100", "dgx-a100", None),
    "splitwise-hh": ("dgx-h100", "dgx-h100", None),
    "splitwise-ha": ("dgx-h100", "dgx-a100", None),
    "splitwise-hhcap": ("dgx-h100", "dgx-h100-cap", None),
}
POOL_ROLES = ("prefill", "decode", "colocated")


@dataclass(frozen=True)
class Pool:
    machine_type: str  # catalog key, e.g. "dgx-h100"
    count: int  # machines

    def __post_init__(self) -> None:
        if not isinstance(self.machine_type, str) or not self.machine_type:
            raise ValueError(f"a pool's machine type must be a non-empty string, got {self.machine_type!r}")
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"a pool needs an integer count >= 1 of machines, got {self.count!r}")


@dataclass(frozen=True)
class ClusterDesign:
    name: str
    prefill: Pool | None = None
    decode: Pool | None = None
    colocated: Pool | None = None

    def __post_init__(self) -> None:
        if (self.prefill is None) != (self.decode is None):
            raise ValueError(
                f"design {self.name!r}: a prefill pool needs a decode pool and vice versa "
                f"(got prefill={self._count(self.prefill)}, decode={self._count(self.decode)})"
            )
        if self.prefill is None and self.colocated is None:
            raise ValueError(f"design {self.name!r} has no machines: give prefill and decode, or colocated")

    @staticmethod
    def _count(pool: Pool | None) -> int:
        return 0 if pool is None else pool.count

    def pools(self) -> list[tuple[str, Pool]]:
        """(role, pool) for each pool the design has, in prefill, decode, colocated order."""
        pools = (("prefill", self.prefill), ("decode", self.decode), ("colocated", self.colocated))
        return [(role, pool) for role, pool in pools if pool is not None]

    def machines(self) -> int:
        return sum(pool.count for _, pool in self.pools())

    def cost_per_hour(self, catalog: Mapping[str, MachineType] | None = None) -> float:
        """USD per hour of the whole cluster; ValueError for a machine type the catalog lacks."""
        return sum(
            pool.count * machine_type(pool.machine_type, catalog).cost_per_hour for _, pool in self.pools()
        )

    def max_power_w(self, catalog: Mapping[str, MachineType] | None = None) -> float:
        """The most the cluster can draw: every machine at its cap (capped types) or rating."""
        return sum(
            pool.count * machine_type(pool.machine_type, catalog).max_power_w for _, pool in self.pools()
        )

    def describe(self) -> str:
        """e.g. 'splitwise-hh: 35 prefill x dgx-h100 + 5 decode x dgx-h100'."""
        parts = [f"{pool.count} {role} x {pool.machine_type}" for role, pool in self.pools()]
        return f"{self.name}: {' + '.join(parts)}"


def machine_type(name: str, catalog: Mapping[str, MachineType] | None = None) -> MachineType:
    """The catalog entry called `name` (the built-in catalog when None); ValueError naming the known ones."""
    types = BUILTIN_MACHINES if catalog is None else catalog
    try:
        return types[name]
    except KeyError:
        raise ValueError(f"unknown machine type {name!r} (known: {', '.join(sorted(types))})") from None


def make_design(name: str, prefill: int = 0, decode: int = 0, colocated: int = 0) -> ClusterDesign:
    """A named design of DESIGNS with these pool sizes; ValueError for an unknown name or sizes it cannot have."""
    try:
        types = DESIGNS[name]
    except KeyError:
        raise ValueError(f"unknown cluster design {name!r} (known: {', '.join(DESIGNS)})") from None
    pools: dict[str, Pool | None] = {}
    for role, type_name, count in zip(POOL_ROLES, types, (prefill, decode, colocated), strict=True):
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"design {name!r}: {role} must be an integer >= 0, got {count!r}")
        if type_name is None:
            if count:
                raise ValueError(f"design {name!r} has no {role} pool, but {role}={count} was given")
            pools[role] = None
        else:
            if count == 0:
                raise ValueError(f"design {name!r} needs {role} >= 1 machines of type {type_name}")
            pools[role] = Pool(type_name, count)
    return ClusterDesign(name, **pools)
