"""Budgets, machine prices and the budget frontier of `splitserve plan`."""

from __future__ import annotations

import pytest

from cluster.machines import BUILTIN_MACHINES
from ops.plan.budget import Budget, frontier, parse_budget, spend
from ops.plan.designs import Config, DesignSpec
from ops.plan.pricing import price_table
from ops.sim import DESIGNS, ClusterDesign, Pool

SPECS = {name: DesignSpec(name, *types) for name, types in DESIGNS.items()}
PAPER_PRICES = price_table(BUILTIN_MACHINES, ["dgx-a100", "dgx-h100", "dgx-h100-cap"], "paper")
RATED_PRICES = price_table(BUILTIN_MACHINES, list(BUILTIN_MACHINES), "rated")
# splitwise-facts.md line 67: the paper's iso-power (prompt, token) splits.
PAPER_SPLITS = {
    "conversation": {"splitwise-aa": (45, 25), "splitwise-hh": (25, 15), "splitwise-ha": (25, 26),
                     "splitwise-hhcap": (25, 21)},
    "coding": {"splitwise-aa": (55, 15), "splitwise-hh": (35, 5), "splitwise-ha": (35, 8), "splitwise-hhcap": (35, 7)},
}  # fmt: skip


def test_machines_budget_is_priced_like_the_configurations() -> None:
    budget = parse_budget("40xdgx-h100", "power", RATED_PRICES)
    assert budget.limit == pytest.approx(40 * BUILTIN_MACHINES["dgx-h100"].max_power_w)
    mixed = parse_budget("25xdgx-h100 + 26*dgx-a100", "cost", RATED_PRICES)
    assert mixed.limit == pytest.approx(25 * 38.0 + 26 * 17.6)
    assert parse_budget("1520", "cost", RATED_PRICES).limit == 1520.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0", "> 0"),
        ("-5", "> 0"),
        ("nan", "> 0"),
        ("40xdgx-b200", "unknown machine type"),
        ("lots", "expected"),
    ],
)
def test_bad_budgets_are_one_line_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_budget(text, "power", RATED_PRICES)


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("limit_w", [30_000.0, 123_456.0, 408_000.0])
def test_frontier_fits_the_budget_and_no_machine_could_be_added(name: str, limit_w: float) -> None:
    spec, budget = SPECS[name], Budget("power", limit_w, "test")
    configs = frontier(spec, budget, RATED_PRICES)
    assert configs, "every built-in design fits a few machines into 30 kW"
    for config in configs:
        assert spend(spec, config, RATED_PRICES, "power") <= limit_w
        grown = (
            [Config(name, config.prefill + 1, config.decode), Config(name, config.prefill, config.decode + 1)]
            if spec.is_split
            else [Config(name, colocated=config.colocated + 1)]
        )
        assert all(spend(spec, g, RATED_PRICES, "power") > limit_w for g in grown)
    if spec.is_split:
        assert [c.prefill for c in configs] == list(range(1, len(configs) + 1))
        assert all(c.decode >= 1 for c in configs)
    else:
        assert len(configs) == 1


def test_a_budget_below_one_machine_per_pool_has_an_empty_frontier() -> None:
    one_a100 = BUILTIN_MACHINES["dgx-a100"].max_power_w
    assert frontier(SPECS["splitwise-aa"], Budget("power", 1.5 * one_a100, "x"), RATED_PRICES) == []
    assert frontier(SPECS["baseline-a100"], Budget("power", 0.5 * one_a100, "x"), RATED_PRICES) == []


def test_rated_power_matches_the_simulators_cluster_power() -> None:
    spec = SPECS["splitwise-hhcap"]
    design = ClusterDesign("splitwise-hhcap", Pool("dgx-h100", 25), Pool("dgx-h100-cap", 21))
    ours = spend(spec, Config(spec.name, 25, 21), RATED_PRICES, "power")
    assert ours == pytest.approx(design.max_power_w(BUILTIN_MACHINES))
    assert spend(spec, Config(spec.name, 25, 21), RATED_PRICES, "cost") == pytest.approx(
        design.cost_per_hour(BUILTIN_MACHINES)
    )


@pytest.mark.parametrize("trace", sorted(PAPER_SPLITS))
def test_on_the_paper_power_basis_the_papers_splits_lie_on_the_iso_power_frontier(trace: str) -> None:
    budget = parse_budget("40xdgx-h100", "power", PAPER_PRICES)
    for name, (prefill, decode) in PAPER_SPLITS[trace].items():
        assert Config(name, prefill, decode) in frontier(SPECS[name], budget, PAPER_PRICES)
    # "40 DGX-H100 = 70 DGX-A100" (line 66) holds on this basis, not on the catalog's ratings.
    assert frontier(SPECS["baseline-a100"], budget, PAPER_PRICES) == [Config("baseline-a100", colocated=70)]
    rated = parse_budget("40xdgx-h100", "power", RATED_PRICES)
    assert frontier(SPECS["baseline-a100"], rated, RATED_PRICES)[0].colocated < 70


def test_the_paper_basis_cannot_price_a_user_machine() -> None:
    with pytest.raises(ValueError, match="--power-basis rated"):
        price_table(BUILTIN_MACHINES, ["cpu"], "paper")
    with pytest.raises(ValueError, match="unknown machine type 'dgx-b200'"):
        price_table(BUILTIN_MACHINES, ["dgx-b200"], "rated")
