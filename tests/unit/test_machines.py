"""Machine catalog: built-in figures from splitwise-facts.md, the power model, cost, and user catalog files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.machines import (
    BUILTIN_MACHINES,
    MachineType,
    PowerReading,
    cost_usd,
    energy_joules,
    load_catalog,
    modeled_reading,
    power_model,
)

approx = pytest.approx


def test_builtin_figures_match_the_facts_file() -> None:
    a100, h100, capped = (BUILTIN_MACHINES[n] for n in ("dgx-a100", "dgx-h100", "dgx-h100-cap"))
    assert (a100.gpus, a100.cost_per_hour, a100.rated_power_w, a100.capped_power_w) == (8, 17.6, 6500, None)
    assert (h100.gpus, h100.cost_per_hour, h100.rated_power_w, h100.capped_power_w) == (8, 38.0, 10200, None)
    assert (capped.gpus, capped.cost_per_hour, capped.rated_power_w, capped.capped_power_w) == (
        8,
        38.0,
        10200,
        7140,
    )
    assert capped.capped_power_w == approx(0.7 * h100.rated_power_w)
    assert a100.idle_power_w == approx(0.3 * 6500)
    assert BUILTIN_MACHINES["cpu"].gpus == 0


def test_power_model_is_linear_from_idle_to_rating() -> None:
    a100 = BUILTIN_MACHINES["dgx-a100"]  # idle 1950 W, rated 6500 W
    assert power_model(a100, 0.0) == approx(1950.0)
    assert power_model(a100, 0.5) == approx(4225.0)
    assert power_model(a100, 1.0) == approx(6500.0)
    assert power_model(a100, -1.0) == approx(1950.0)
    assert power_model(a100, 7.0) == approx(6500.0)


def test_capped_machine_tops_out_at_its_cap() -> None:
    h100, capped = BUILTIN_MACHINES["dgx-h100"], BUILTIN_MACHINES["dgx-h100-cap"]  # idle 3060 W for both
    assert power_model(capped, 0.0) == power_model(h100, 0.0) == approx(3060.0)
    assert power_model(h100, 0.5) == approx(6630.0)
    assert power_model(capped, 0.5) == approx(5100.0)
    assert power_model(capped, 1.0) == approx(7140.0)
    reading = modeled_reading(capped, 1.0)
    assert (reading.watts, reading.source) == (approx(7140.0), "modeled")


def test_cost_and_energy() -> None:
    assert cost_usd(BUILTIN_MACHINES["dgx-a100"], 1800) == approx(8.8)
    assert cost_usd(BUILTIN_MACHINES["dgx-h100"], 1) == approx(38.0 / 3600)
    assert energy_joules(6500.0, 3600) == approx(6500 * 3600)
    with pytest.raises(ValueError):
        cost_usd(BUILTIN_MACHINES["dgx-a100"], -1)


def test_power_reading_rejects_unknown_source() -> None:
    with pytest.raises(ValueError, match="source"):
        PowerReading(100.0, "guessed")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", ""),
        ("gpus", -1),
        ("cost_per_hour", -0.5),
        ("rated_power_w", 0),
        ("idle_power_w", 9000.0),
        ("capped_power_w", 20000.0),
    ],
)
def test_machine_type_validation_names_the_field(field: str, value: object) -> None:
    fields = {
        "name": "x",
        "accelerator": "a100-80gb",
        "gpus": 8,
        "cost_per_hour": 1.0,
        "rated_power_w": 6500.0,
        "capped_power_w": None,
        "idle_power_w": 1000.0,
    }
    fields[field] = value
    with pytest.raises(ValueError, match=field):
        MachineType(**fields)  # type: ignore[arg-type]


def _write(tmp_path: Path, document: object) -> Path:
    path = tmp_path / "machines.json"
    path.write_text(json.dumps(document))
    return path


def test_no_file_gives_the_builtins() -> None:
    assert load_catalog(None) == BUILTIN_MACHINES
    assert load_catalog() is not BUILTIN_MACHINES


def test_user_file_adds_and_overrides(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        {
            "machines": [
                {
                    "name": "dgx-a100",
                    "accelerator": "a100-80gb",
                    "gpus": 8,
                    "cost_per_hour": 12.0,
                    "rated_power_w": 6500,
                },
                {
                    "name": "l40s-x4",
                    "accelerator": "l40s",
                    "gpus": 4,
                    "cost_per_hour": 7.5,
                    "rated_power_w": 2400,
                    "capped_power_w": 2000,
                    "idle_power_w": 500,
                },
            ]
        },
    )
    catalog = load_catalog(str(path))
    assert catalog["dgx-a100"].cost_per_hour == 12.0
    assert catalog["dgx-a100"].idle_power_w == approx(0.3 * 6500)
    assert catalog["l40s-x4"] == MachineType("l40s-x4", "l40s", 4, 7.5, 2400, 2000, 500)
    assert catalog["dgx-h100"] == BUILTIN_MACHINES["dgx-h100"]
    assert BUILTIN_MACHINES["dgx-a100"].cost_per_hour == 17.6


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "machines"),
        ({"machines": [5]}, r"machines\[0\]: expected an object"),
        ({"machines": [{"name": "m", "gpus": 1}]}, r"machines\[0\] \('m'\): missing field"),
        (
            {
                "machines": [
                    {
                        "name": "m",
                        "accelerator": "a",
                        "gpus": 1,
                        "cost_per_hour": 1,
                        "rated_power_w": 10,
                        "colour": "red",
                    }
                ]
            },
            "unknown field",
        ),
        (
            {
                "machines": [
                    {"name": "m", "accelerator": "a", "gpus": "8", "cost_per_hour": 1, "rated_power_w": 10}
                ]
            },
            r"\('m'\): MachineType.gpus",
        ),
        (
            {
                "machines": [
                    {"name": "m", "accelerator": "a", "gpus": 1, "cost_per_hour": 1, "rated_power_w": 10}
                ]
                * 2
            },
            r"machines\[1\].*duplicate",
        ),
    ],
)
def test_malformed_file_names_file_and_entry(tmp_path: Path, document: object, message: str) -> None:
    path = _write(tmp_path, document)
    with pytest.raises(ValueError, match=message) as info:
        load_catalog(path)
    assert "machines.json" in str(info.value)


def test_unreadable_file_is_a_value_error(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"broken\.json"):
        load_catalog(tmp_path / "broken.json")
    with pytest.raises(ValueError, match=r"absent\.json"):
        load_catalog(tmp_path / "absent.json")
