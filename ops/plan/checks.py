"""The paper's directions, checked on a plan (the issue's acceptance, stated as pass/fail lines):

- at iso-power (or iso-cost) every phase-split design sustains a higher rate within all 9 SLOs than Baseline-A100;
- Splitwise-HHcap matches Splitwise-HH's latency at lower power: HHcap with HH's chosen pool sizes, at HH's
  chosen rate, meets all 9 SLOs with P50 TTFT, TBT and E2E within LATENCY_MATCH of HH's, and draws less power.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ops.plan.designs import BASELINE_A100, Config
from ops.plan.outcome import DesignPlan, Goal, Trial, maximises_throughput

HH, HHCAP = "splitwise-hh", "splitwise-hhcap"
LATENCY_MATCH = 0.15  # relative difference of a P50 latency that still "matches"


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


def beats_baseline(goal: Goal, plans: Sequence[DesignPlan]) -> list[Check]:
    """One check per phase-split design: a higher maximum rate than Baseline-A100 within the same budget."""
    baseline = next((p for p in plans if p.spec.name == BASELINE_A100), None)
    if not maximises_throughput(goal) or baseline is None:
        return []
    checks = []
    base_rps = baseline.best.rps if baseline.best is not None else 0.0
    for plan in plans:
        if not plan.spec.is_split:
            continue
        rps = plan.best.rps if plan.best is not None else 0.0
        ratio = f"{rps / base_rps:.2f}x" if base_rps > 0 else "n/a (the baseline meets the SLOs at no rate)"
        checks.append(
            Check(
                f"{plan.spec.name} sustains more load than {BASELINE_A100} at {goal}",
                rps > base_rps,
                f"{rps:.2f} vs {base_rps:.2f} req/s within all 9 SLOs ({ratio})",
            )
        )
    return checks


def capped_twin(plans: Mapping[str, DesignPlan]) -> Config | None:
    """HHcap at HH's chosen pool sizes, when both designs are in the plan and HH has an answer."""
    hh = plans.get(HH)
    if hh is None or hh.best is None or HHCAP not in plans:
        return None
    return Config(HHCAP, prefill=hh.best.config.prefill, decode=hh.best.config.decode)


def capped_matches_uncapped(hh: DesignPlan, capped: Trial, hh_power_w: float, capped_power_w: float) -> Check:
    assert hh.best is not None and hh.best.trial is not None
    reference = hh.best.trial
    deltas = {
        "TTFT": _relative(capped.ttft_p50_s, reference.ttft_p50_s),
        "TBT": _relative(capped.tbt_p50_s, reference.tbt_p50_s),
        "E2E": _relative(capped.e2e_p50_s, reference.e2e_p50_s),
    }
    latency_ok = all(d is not None and abs(d) <= LATENCY_MATCH for d in deltas.values())
    power_change = capped_power_w / hh_power_w - 1.0
    shown = ", ".join(f"{name} {_signed(d)}" for name, d in deltas.items())
    slos = "meets all 9 SLOs" if capped.passed else f"misses an SLO ({capped.binding})"
    return Check(
        f"{HHCAP} matches {HH}'s latency at lower power",
        capped.passed and latency_ok and power_change < 0,
        f"at {hh.best.config.label()} and {capped.rps:.2f} req/s: {slos}; P50 vs {HH}: {shown}; "
        f"power {_signed(power_change)}",
    )


def _relative(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference <= 0:
        return None
    return value / reference - 1.0


def _signed(change: float | None) -> str:
    return "n/a" if change is None else f"{change * 100:+.1f}%"
