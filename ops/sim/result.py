"""What a simulation reports: per-request latencies, the Splitwise 9-SLO check, throughput, cost and energy.

Accounting:
- duration: from the first arrival to the last completion. The cluster is paid for and powered all that time.
- cost: machines x $/h x duration (whole machines, busy or not).
- energy: every node's modeled draw integrated over the duration: prompt power while computing prompts, token power
  while decoding, idle power otherwise (ops/sim/hardware.py has the powers).
- throughput: completed requests and output tokens per second of duration.
- SLO: per request, the slowdown against the same request alone on the reference hardware: alone TTFT =
  prompt_time_s(P), alone TBT = token_time_s(1), alone E2E = TTFT + (O - 1) x TBT. P50/P90/P99 of each slowdown
  against cluster.slo.SPLITWISE_SLO_LIMITS; TBT leaves out single-token outputs (they have none).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cluster.slo import SPLITWISE_SLO_LIMITS
from ops.bench.slo import SloCheck, SloRow
from ops.bench.stats import Stats, percentile
from ops.sim.timing import BatchTimer

if TYPE_CHECKING:
    from cluster.machines import MachineType
    from ops.sim.design import ClusterDesign

__all__ = ["SimResult", "slo_check", "slowdown_check"]


@dataclass
class SimResult:
    # per request, in trace order
    arrival_s: np.ndarray
    ttft_s: np.ndarray
    tbt_s: np.ndarray  # mean time between tokens after the first; nan for one-token outputs
    e2e_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    prefill_node: list[str]  # the node that computed the prompt (and decoded, when it ran both phases)
    decode_node: list[str]
    # aggregates
    design: str  # ClusterDesign.describe()
    policy: str
    reference_hardware: str
    machines: int
    cost_per_hour: float
    duration_s: float
    throughput_rps: float
    tokens_per_s: float
    cost_usd: float
    energy_j: float
    slo: SloCheck
    slo_passed: bool
    wall_s: float  # real seconds the simulation took
    events: int  # events processed (arrivals, iteration-run ends, KV arrivals)

    @classmethod
    def assemble(
        cls,
        design: ClusterDesign,
        catalog: Mapping[str, MachineType],
        *,
        latencies: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
        prompt: np.ndarray,
        output: np.ndarray,
        nodes: tuple[list[str], list[str]],
        policy: str,
        reference_hardware: str,
        duration_s: float,
        energy_j: float,
        slo: SloCheck,
        wall_s: float,
        events: int,
    ) -> SimResult:
        """A run's result from its per-request figures: latencies = (arrival, ttft, tbt, e2e), nodes = (prefill,
        decode) per request; throughput and cost follow from the duration and the design."""
        arrival, ttft, tbt, e2e = latencies
        cost_per_hour = design.cost_per_hour(catalog)
        return cls(
            arrival_s=arrival,
            ttft_s=ttft,
            tbt_s=tbt,
            e2e_s=e2e,
            prompt_tokens=prompt,
            output_tokens=output,
            prefill_node=nodes[0],
            decode_node=nodes[1],
            design=design.describe(),
            policy=policy,
            reference_hardware=reference_hardware,
            machines=design.machines(),
            cost_per_hour=cost_per_hour,
            duration_s=duration_s,
            throughput_rps=len(arrival) / duration_s if duration_s > 0 else math.inf,
            tokens_per_s=float(output.sum()) / duration_s if duration_s > 0 else math.inf,
            cost_usd=cost_per_hour * duration_s / 3600.0,
            energy_j=energy_j,
            slo=slo,
            slo_passed=slo.passed,
            wall_s=wall_s,
            events=events,
        )

    @property
    def machine_hours(self) -> float:
        return self.machines * self.duration_s / 3600.0

    def latency_stats(self) -> dict[str, Stats]:
        return {
            "ttft": Stats.of(self.ttft_s.tolist()),
            "tbt": Stats.of(self.tbt_s[~np.isnan(self.tbt_s)].tolist()),
            "e2e": Stats.of(self.e2e_s.tolist()),
        }

    def summary_lines(self) -> list[str]:
        lines = [
            f"design       {self.design} ({self.machines} machines, ${self.cost_per_hour:,.2f}/h), policy {self.policy}",
            f"requests     {len(self.arrival_s):,} in {self.duration_s:,.1f} s simulated",
            f"{'latency':<12} {'p50':>10} {'p90':>10} {'p99':>10} {'mean':>10}",
        ]
        for name, stats in self.latency_stats().items():
            cells = [_seconds(stats.p50), _seconds(stats.p90), _seconds(stats.p99), _seconds(stats.mean)]
            lines.append(f"{name.upper() + ' (s)':<12} " + " ".join(f"{c:>10}" for c in cells))
        verdict = "PASS" if self.slo_passed else "FAIL"
        lines.append(f"Splitwise 9-SLO check vs alone on {self.reference_hardware}: {verdict}")
        for row in self.slo.rows:
            slowdown = "-" if row.slowdown is None else f"{row.slowdown:.2f}x"
            lines.append(
                f"  {row.metric.upper():<5} P{row.percentile:<3} {slowdown:>9} <= {row.limit:g}x"
                f"  {'ok' if row.ok else 'MISSED'}"
            )
        events_per_s = self.events / self.wall_s if self.wall_s > 0 else math.inf
        lines += [
            f"throughput   {self.throughput_rps:,.3f} requests/s, {self.tokens_per_s:,.1f} output tokens/s",
            f"cost         ${self.cost_usd:,.2f} (${self.cost_per_hour:,.2f}/h), "
            f"{self.machine_hours:,.2f} machine-hours",
            f"energy       {self.energy_j / 3.6e6:,.2f} kWh (mean {self.energy_j / self.duration_s / 1e3:,.1f} kW)"
            if self.duration_s > 0
            else f"energy       {self.energy_j / 3.6e6:,.2f} kWh",
            f"simulation   {self.wall_s:,.2f} s wall, {self.events:,} events ({events_per_s:,.0f} events/s)",
        ]
        return lines

    def to_dict(self, per_request: bool = True) -> dict[str, Any]:
        """JSON-safe: nan becomes None; per-request lists only when asked."""
        out: dict[str, Any] = {
            "design": self.design,
            "policy": self.policy,
            "reference_hardware": self.reference_hardware,
            "machines": self.machines,
            "cost_per_hour": self.cost_per_hour,
            "requests": len(self.arrival_s),
            "duration_s": self.duration_s,
            "throughput_rps": self.throughput_rps,
            "tokens_per_s": self.tokens_per_s,
            "cost_usd": self.cost_usd,
            "machine_hours": self.machine_hours,
            "energy_j": self.energy_j,
            "energy_kwh": self.energy_j / 3.6e6,
            "latency": {name: _stats_dict(stats) for name, stats in self.latency_stats().items()},
            "slo": {
                "mode": self.slo.mode,
                "compared": self.slo.compared,
                "passed": self.slo.passed,
                "rows": [
                    {
                        "metric": r.metric,
                        "percentile": r.percentile,
                        "slowdown": _finite_or_none(r.slowdown),
                        "limit": r.limit,
                        "ok": r.ok,
                    }
                    for r in self.slo.rows
                ],
            },
            "slo_passed": self.slo_passed,
            "wall_s": self.wall_s,
            "events": self.events,
        }
        if per_request:
            out["per_request"] = {
                "arrival_s": self.arrival_s.tolist(),
                "prompt_tokens": self.prompt_tokens.tolist(),
                "output_tokens": self.output_tokens.tolist(),
                "ttft_s": _list_or_none(self.ttft_s),
                "tbt_s": _list_or_none(self.tbt_s),
                "e2e_s": _list_or_none(self.e2e_s),
                "prefill_node": list(self.prefill_node),
                "decode_node": list(self.decode_node),
            }
        return out


def slo_check(
    reference: BatchTimer,
    prompt: np.ndarray,
    output: np.ndarray,
    ttft: np.ndarray,
    tbt: np.ndarray,
    e2e: np.ndarray,
) -> SloCheck:
    """Splitwise's nine limits on per-request slowdowns against each request alone on `reference`."""
    alone_ttft = np.array([reference.prompt_s(int(p)) for p in prompt])
    alone_tbt = reference.token_s(1)
    alone_e2e = alone_ttft + (output - 1) * alone_tbt
    slowdowns = {"ttft": ttft / alone_ttft, "tbt": tbt[~np.isnan(tbt)] / alone_tbt, "e2e": e2e / alone_e2e}
    return slowdown_check(slowdowns, compared=len(prompt))


def slowdown_check(slowdowns: Mapping[str, Any], compared: int, strict: bool = False) -> SloCheck:
    """P50/P90/P99 of each metric's per-request slowdowns against SPLITWISE_SLO_LIMITS: at or under each limit, or
    strictly under it (the paper's notebooks). A metric without values (no multi-token output) passes."""
    rows = []
    for (metric, q), limit in SPLITWISE_SLO_LIMITS.items():
        values = slowdowns[metric]
        slowdown = percentile(values, q) if len(values) else None
        ok = slowdown is None or (slowdown < limit if strict else slowdown <= limit)
        rows.append(SloRow(metric=metric, percentile=q, slowdown=slowdown, limit=limit, ok=ok))
    return SloCheck(
        mode="per_request",
        compared=compared,
        rows=tuple(rows),
        passed=compared > 0 and all(r.ok for r in rows),
    )


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value


def _list_or_none(values: np.ndarray) -> list[float | None]:
    return [None if math.isnan(v) else v for v in values.tolist()]


def _stats_dict(stats: Stats) -> dict[str, float | int | None]:
    return {
        "count": stats.count,
        "mean": stats.mean,
        "p50": stats.p50,
        "p90": stats.p90,
        "p99": stats.p99,
        "max": stats.max,
    }
