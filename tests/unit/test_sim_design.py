"""Cluster designs: the named Splitwise designs, their sizes, price and power, and the errors for impossible ones."""

from __future__ import annotations

import pytest

from cluster.machines import BUILTIN_MACHINES, MachineType
from ops.sim import DESIGNS, ClusterDesign, Pool, make_design


def test_named_designs_put_the_catalog_types_in_their_pools() -> None:
    hh = make_design("splitwise-hhcap", prefill=35, decode=7)
    assert hh.prefill == Pool("dgx-h100", 35)
    assert hh.decode == Pool("dgx-h100-cap", 7)
    assert hh.colocated is None
    assert hh.machines() == 42
    baseline = make_design("baseline-a100", colocated=70)
    assert baseline.pools() == [("colocated", Pool("dgx-a100", 70))]
    for types in DESIGNS.values():
        assert all(name is None or name in BUILTIN_MACHINES for name in types)


def test_cost_and_power_sum_over_the_pools() -> None:
    design = make_design("splitwise-ha", prefill=3, decode=2)
    a100, h100 = BUILTIN_MACHINES["dgx-a100"], BUILTIN_MACHINES["dgx-h100"]
    assert design.cost_per_hour() == pytest.approx(3 * h100.cost_per_hour + 2 * a100.cost_per_hour)
    assert design.max_power_w() == pytest.approx(3 * h100.max_power_w + 2 * a100.max_power_w)
    capped = make_design("splitwise-hhcap", prefill=1, decode=1)
    assert capped.max_power_w() == pytest.approx(
        h100.rated_power_w + BUILTIN_MACHINES["dgx-h100-cap"].max_power_w
    )


def test_a_user_catalog_prices_its_own_types() -> None:
    catalog = {"box": MachineType("box", "l4-24gb", 4, 3.0, 1200.0, None, 300.0)}
    design = ClusterDesign("custom", prefill=Pool("box", 2), decode=Pool("box", 1))
    assert design.cost_per_hour(catalog) == pytest.approx(9.0)
    with pytest.raises(ValueError, match="unknown machine type 'box'"):
        design.cost_per_hour()


@pytest.mark.parametrize(
    ("name", "counts", "message"),
    [
        ("splitwise-xx", {"prefill": 1, "decode": 1}, "unknown cluster design 'splitwise-xx'"),
        ("splitwise-hh", {"prefill": 3}, "needs decode >= 1"),
        ("splitwise-hh", {"prefill": 3, "decode": 1, "colocated": 2}, "has no colocated pool"),
        ("baseline-h100", {"colocated": -1}, "must be an integer >= 0"),
    ],
)
def test_impossible_designs_are_refused(name: str, counts: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_design(name, **counts)


def test_a_design_needs_a_way_to_serve() -> None:
    with pytest.raises(ValueError, match="no machines"):
        ClusterDesign("empty")
    with pytest.raises(ValueError, match="needs a decode pool"):
        ClusterDesign("half", prefill=Pool("dgx-a100", 1))
    with pytest.raises(ValueError, match="count >= 1"):
        Pool("dgx-a100", 0)
