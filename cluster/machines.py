"""The machine-type catalog: what a machine costs, what power it is rated for, and a simple power model.

The router and the simulator use this module, so it depends on the standard library only.

Figures for the built-in types come from /work/shared/design/splitwise-facts.md (paper Table I and the Splitwise
simulator's configs); the line numbers are quoted beside each constant. Where the facts give no figure (idle power,
the CPU dev machine) the value is an assumption and is marked as one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

# Assumption: the facts file gives no idle power, so a machine idles at this fraction of its rated power.
IDLE_FRACTION = 0.30

PowerSource = Literal["measured", "modeled"]


@dataclass(frozen=True, slots=True)
class MachineType:
    name: str  # catalog key, e.g. "dgx-a100"
    accelerator: str  # e.g. "a100-80gb"; "cpu" for a machine without accelerators
    gpus: int  # accelerators per machine (0 for a CPU-only machine)
    cost_per_hour: float  # USD per machine-hour
    rated_power_w: float  # whole-machine power rating, W
    capped_power_w: float | None  # whole-machine power cap, W; None when uncapped
    idle_power_w: float  # whole-machine power at zero utilisation, W

    def __post_init__(self) -> None:
        for name in ("name", "accelerator"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"MachineType.{name} must be a non-empty string, got {value!r}")
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or self.gpus < 0:
            raise ValueError(f"MachineType.gpus must be an integer >= 0, got {self.gpus!r}")
        _check_number("cost_per_hour", self.cost_per_hour, minimum=0.0)
        _check_number("rated_power_w", self.rated_power_w, minimum=0.0, strict=True)
        _check_number("idle_power_w", self.idle_power_w, minimum=0.0)
        if self.idle_power_w > self.rated_power_w:
            raise ValueError(
                f"MachineType.idle_power_w ({self.idle_power_w}) exceeds rated_power_w ({self.rated_power_w})"
            )
        if self.capped_power_w is not None:
            _check_number("capped_power_w", self.capped_power_w, minimum=0.0, strict=True)
            if not self.idle_power_w <= self.capped_power_w <= self.rated_power_w:
                raise ValueError(
                    f"MachineType.capped_power_w ({self.capped_power_w}) must lie between idle_power_w "
                    f"({self.idle_power_w}) and rated_power_w ({self.rated_power_w})"
                )

    @property
    def max_power_w(self) -> float:
        """The most this machine draws: its cap when capped, else its rating."""
        return self.rated_power_w if self.capped_power_w is None else self.capped_power_w


def _check_number(name: str, value: object, *, minimum: float, strict: bool = False) -> None:
    ok = False
    if isinstance(value, int | float) and not isinstance(value, bool):
        ok = math.isfinite(value) and (value > minimum if strict else value >= minimum)
    if not ok:
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ValueError(f"MachineType.{name} must be a finite number {bound}, got {value!r}")


def _dgx(
    name: str, accelerator: str, cost: float, rated_w: float, capped_w: float | None = None
) -> MachineType:
    return MachineType(name, accelerator, 8, cost, rated_w, capped_w, IDLE_FRACTION * rated_w)


BUILTIN_MACHINES: dict[str, MachineType] = {
    m.name: m
    for m in (
        # splitwise-facts.md line 22: "$17.6/h" per 8-GPU A100 machine; line 24: "DGX-A100 6500 W".
        _dgx("dgx-a100", "a100-80gb", 17.6, 6500.0),
        # line 22: "$38/h" per 8-GPU H100 machine; line 24: "DGX-H100 10200 W".
        _dgx("dgx-h100", "h100-80gb", 38.0, 10200.0),
        # line 24: "capped DGX-H100 7140 W" (= 70% of 10200 W; line 33: "70% machine power (50% per GPU)").
        # The facts give no separate price for a capped machine: it is the same hardware, so the same cost.
        _dgx("dgx-h100-cap", "h100-80gb-pcap", 38.0, 10200.0, capped_w=7140.0),
        # Illustrative, not from the facts: this project's 2-core dev machine, priced like a small cloud VM.
        MachineType("cpu", "cpu", 0, 0.10, 100.0, None, IDLE_FRACTION * 100.0),
    )
}


@dataclass(frozen=True, slots=True)
class PowerReading:
    watts: float  # whole-machine power, W
    source: PowerSource  # "measured" from a meter/NVML, or "modeled" by power_model()

    def __post_init__(self) -> None:
        if self.source not in ("measured", "modeled"):
            raise ValueError(f"PowerReading.source must be 'measured' or 'modeled', got {self.source!r}")
        if not math.isfinite(self.watts) or self.watts < 0:
            raise ValueError(f"PowerReading.watts must be a finite number >= 0, got {self.watts!r}")


def power_model(machine: MachineType, utilisation: float) -> float:
    """Modeled machine power in W, linear from idle to the effective maximum (the cap when capped).

    utilisation is clipped to [0, 1]."""
    if math.isnan(utilisation):
        raise ValueError("utilisation must be a number, got NaN")
    u = min(1.0, max(0.0, utilisation))
    return machine.idle_power_w + (machine.max_power_w - machine.idle_power_w) * u


def modeled_reading(machine: MachineType, utilisation: float) -> PowerReading:
    return PowerReading(power_model(machine, utilisation), "modeled")


def energy_joules(power_w: float, seconds: float) -> float:
    if power_w < 0 or seconds < 0:
        raise ValueError(f"power and duration must be >= 0, got {power_w} W for {seconds} s")
    return power_w * seconds


def cost_usd(machine: MachineType, seconds: float) -> float:
    """Cost of holding one machine for `seconds`, pro-rated per second of the hourly price."""
    if seconds < 0:
        raise ValueError(f"duration must be >= 0, got {seconds} s")
    return machine.cost_per_hour * seconds / 3600.0


_FIELD_NAMES = tuple(f.name for f in fields(MachineType))
_OPTIONAL_FIELDS = ("capped_power_w", "idle_power_w")


def load_catalog(path: str | Path | None = None) -> dict[str, MachineType]:
    """The built-in machine types plus those in a JSON file `{"machines": [{...MachineType fields...}]}`.

    A user entry may omit capped_power_w (uncapped) and idle_power_w (IDLE_FRACTION of rated power); an entry
    whose name matches a built-in replaces it. Any malformed file or entry raises ValueError naming both."""
    catalog = dict(BUILTIN_MACHINES)
    if path is None:
        return catalog
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read machine catalog: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("machines"), list):
        raise ValueError(f'{path}: expected an object {{"machines": [...]}}')
    seen: set[str] = set()
    for index, entry in enumerate(document["machines"]):
        machine = _parse_entry(path, index, entry)
        if machine.name in seen:
            raise ValueError(f"{path}: machines[{index}]: duplicate machine name {machine.name!r}")
        seen.add(machine.name)
        catalog[machine.name] = machine
    return catalog


def _parse_entry(path: Path, index: int, entry: Any) -> MachineType:
    where = f"{path}: machines[{index}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
    where = f"{where} ({entry.get('name', '?')!r})"
    unknown = sorted(set(entry) - set(_FIELD_NAMES))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known: {list(_FIELD_NAMES)}")
    missing = [name for name in _FIELD_NAMES if name not in entry and name not in _OPTIONAL_FIELDS]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")
    values = dict(entry)
    values.setdefault("capped_power_w", None)
    if "idle_power_w" not in values:
        rated = values["rated_power_w"]
        values["idle_power_w"] = IDLE_FRACTION * rated if isinstance(rated, int | float) else rated
    try:
        return MachineType(**values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from exc
