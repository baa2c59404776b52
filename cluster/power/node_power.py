"""A node's machine type, latency model and power cap: from its flags, then at start-up its meter and ledger.

Two stages, so that bad input fails in one line before a model is loaded:
1. `resolve_settings` (the CLI, before anything starts): the machine type from the catalog (built-in types plus
   `--machines FILE`), the performance model (`--perf-model CSV`, `--perf-group MODEL/HARDWARE/TP`), and the cap
   (`--power-cap-w W|recommend`, `--power-cap-target-s`, `--power-cap-apply`). ValueError with one line otherwise.
2. `start_node_power` (the node, before it loads its model): picks the meter (NVML or the power model), decides and
   applies the cap (PowerCapError if the GPU's own range refuses it), and builds the ChargeLedger the node's engine
   reports its steps to.
Where the cap takes effect: with NVML and `--power-cap-apply`, on the GPUs (and in the modeled maximum the node
registers); with NVML and no `--power-cap-apply`, nowhere (the node logs the NVML calls it would make); without
NVML, in the modeled power only, which the node says in its log line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from cluster.machines import MachineType, load_catalog
from cluster.perfmodel import PerfGroup, PerfModel, PerfSummary, available
from cluster.power.accounting import ChargeLedger
from cluster.power.powercap import (
    CapDecision,
    CapRange,
    LatencyPhase,
    NvmlCall,
    PowerCapError,
    apply_cap,
    cap_range_from_nvml,
    cap_range_of,
    capped_machine,
    latency_factor,
    recommend_cap,
)
from cluster.power.telemetry import (
    ModeledPowerMeter,
    NvmlPowerMeter,
    PowerMeter,
    UtilisationWindow,
    create_meter,
)
from cluster.slo import SPLITWISE_SLO_LIMITS

RECOMMEND: Final = "recommend"
# Load reports round modeled power to this fraction of the machine's maximum: publishing on every watt of drift
# (utilisation decays smoothly after a burst) would defeat the load publisher's "publish on change" and multiply
# Redis traffic for nothing placement can use. Measured power (a few GPUs, not the machine) is rounded to watts.
REPORT_STEP_FRACTION = 0.01


@dataclass(frozen=True, slots=True)
class PowerSettings:
    machine: MachineType
    perf: PerfModel | None
    cap: float | Literal["recommend"] | None  # watts per GPU
    cap_target_s: float | None  # the node's latency target for `recommend` (None: from Splitwise's SLOs)
    apply_cap: bool


def parse_cap(text: str) -> float | Literal["recommend"]:
    if text == RECOMMEND:
        return RECOMMEND
    try:
        watts = float(text)
    except ValueError:
        raise ValueError(f"--power-cap-w must be watts per GPU or 'recommend', got {text!r}") from None
    if not watts > 0 or watts == float("inf"):
        raise ValueError(f"--power-cap-w must be > 0 watts, got {text!r}")
    return watts


def resolve_settings(
    machine_type: str,
    machines_file: Path | None = None,
    perf_csv: Path | None = None,
    perf_group: str | None = None,
    cap: str | None = None,
    cap_target_s: float | None = None,
    apply: bool = False,
) -> PowerSettings:
    catalog = load_catalog(machines_file)
    if machine_type not in catalog:
        raise ValueError(f"unknown machine type {machine_type!r}; known: {', '.join(sorted(catalog))}")
    if perf_group is not None and perf_csv is None:
        raise ValueError("--perf-group needs --perf-model")
    perf = None
    if perf_csv is not None:
        group = choose_perf_group(perf_csv, perf_group)
        perf = PerfModel.from_csv(perf_csv, group.model, group.hardware, group.tensor_parallel)
    parsed_cap = parse_cap(cap) if cap is not None else None
    if parsed_cap == RECOMMEND and perf is None:
        raise ValueError("--power-cap-w recommend needs --perf-model: the latency it predicts under each cap")
    if parsed_cap == RECOMMEND and catalog[machine_type].gpus < 1:
        raise ValueError(f"--power-cap-w recommend needs GPUs; machine type {machine_type!r} has none")
    if cap_target_s is not None and not cap_target_s > 0:
        raise ValueError(f"--power-cap-target-s must be > 0, got {cap_target_s}")
    return PowerSettings(catalog[machine_type], perf, parsed_cap, cap_target_s, apply)


def choose_perf_group(csv: Path, text: str | None) -> PerfGroup:
    """The group named MODEL/HARDWARE/TP (TP as 8 or tp8), or the file's only group when none is named."""
    groups = available(csv)
    names = ", ".join(f"{g.model}/{g.hardware}/{g.tensor_parallel}" for g in groups)
    if text is None:
        if len(groups) != 1:
            raise ValueError(f"{csv} holds {len(groups)} groups; pick one with --perf-group: {names}")
        return groups[0]
    parts = text.split("/")
    tp = parts[-1].removeprefix("tp") if len(parts) == 3 else ""
    if not tp.isdigit():
        raise ValueError(f"--perf-group must be MODEL/HARDWARE/TP, got {text!r}")
    group = PerfGroup(parts[0], parts[1], int(tp))
    if group not in groups:
        raise ValueError(f"{csv} has no group {text!r}; available: {names}")
    return group


@dataclass(slots=True)
class NodePower:
    """What a running node knows about its power: the meter, the ledger, and the figures it registers."""

    machine: MachineType  # as it draws: capped when a cap is in effect
    perf: PerfSummary | None  # its latency lines, under the cap when one is in effect
    meter: PowerMeter
    ledger: ChargeLedger
    log: dict[str, Any]  # one JSON line for the node's output: meter, cap, NVML calls

    def registration(self) -> dict[str, Any]:
        """The NodeInfo fields this module fills."""
        return {
            "machine_type": self.machine.name,
            "cost_per_hour": self.machine.cost_per_hour,
            "idle_power_w": self.machine.idle_power_w,
            "max_power_w": self.machine.max_power_w,
            "perf": self.perf.as_tuple() if self.perf is not None else (0.0, 0.0, 0.0, 0.0),
        }

    def load_fields(self) -> dict[str, Any]:
        """The LoadReport fields this module fills: the meter's reading, rounded (REPORT_STEP_FRACTION)."""
        reading = self.meter.read()
        step = (
            1.0 if reading.source == "measured" else max(1.0, REPORT_STEP_FRACTION * self.machine.max_power_w)
        )
        return {"power_w": round(reading.watts / step) * step, "power_source": reading.source}

    def close(self) -> None:
        self.meter.close()


def start_node_power(
    settings: PowerSettings, role: str, device: str, max_batched_tokens: int, max_seqs: int
) -> NodePower:
    window = UtilisationWindow()
    meter = create_meter(settings.machine, device, window)
    machine, perf = settings.machine, settings.perf.summary() if settings.perf is not None else None
    log: dict[str, Any] = {"event": "power", "machine_type": machine.name, "meter": meter.description}
    if settings.cap is not None:
        try:
            machine, perf, cap_log = _set_cap(settings, meter, role, max_batched_tokens, max_seqs)
        except BaseException:
            meter.close()
            raise
        log.update(cap_log)
        if isinstance(meter, ModeledPowerMeter):
            meter.machine = machine
    log["max_power_w"] = machine.max_power_w
    ledger = ChargeLedger(meter, machine.cost_per_hour, busy_window=window)
    return NodePower(machine, perf, meter, ledger, log)


def _set_cap(
    settings: PowerSettings, meter: PowerMeter, role: str, max_batched_tokens: int, max_seqs: int
) -> tuple[MachineType, PerfSummary | None, dict[str, Any]]:
    machine = settings.machine
    nvml = meter if isinstance(meter, NvmlPowerMeter) else None
    caps = cap_range_from_nvml(nvml.nvml, nvml.gpu_indices[0]) if nvml else None
    if caps is None and machine.gpus > 0:
        caps = cap_range_of(machine)
    log: dict[str, Any]
    if isinstance(settings.cap, float):
        watts, log = settings.cap, {"cap_w": settings.cap}
    elif settings.perf is not None and caps is not None:  # resolve_settings made sure of both for `recommend`
        decision = recommend_for_role(
            role, settings.perf, caps, max_batched_tokens, max_seqs, settings.cap_target_s
        )
        watts, log = decision.watts, {"cap_w": decision.watts, "cap_reason": decision.reason}
    else:
        raise PowerCapError("--power-cap-w recommend needs --perf-model and a machine type with GPUs")
    if caps is not None:
        caps.check(watts)
    if nvml is not None:
        calls: list[NvmlCall] = apply_cap(watts, nvml.nvml, nvml.gpu_indices, dry_run=not settings.apply_cap)
        log["nvml_calls"] = [str(c) for c in calls]
        log["dry_run"] = not settings.apply_cap
        if not settings.apply_cap:
            log["cap_note"] = "dry run: nothing was changed on the GPU (add --power-cap-apply to set it)"
            return machine, _perf_under_cap(settings.perf, None, caps), log
    else:
        log["cap_note"] = "no NVML here: the cap changes the modeled maximum power only" + (
            "; --power-cap-apply has nothing to apply" if settings.apply_cap else ""
        )
    return capped_machine(machine, watts), _perf_under_cap(settings.perf, watts, caps), log


def recommend_for_role(
    role: str,
    perf: PerfModel,
    caps: CapRange,
    max_batched_tokens: int,
    max_seqs: int,
    target_s: float | None = None,
) -> CapDecision:
    """The cap a node's SLO slack allows, judged on a full batch of its own.

    A decode node's SLO is on TBT: a full decode iteration (max_seqs sequences) against the target, by default
    Splitwise's P50 TBT slowdown limit (1.25x) over one sequence decoding alone. Prefill and colocated nodes are
    judged on TTFT, the phase that capping slows: a full prefill iteration (max_batched_tokens) against, by default,
    the P50 TTFT limit (2x) over the same prompt tokens alone, which is that iteration itself."""
    phase: LatencyPhase
    if role == "decode":
        phase, predicted = "token", perf.token_time_s(max_seqs)
        alone, limit = perf.token_time_s(1), SPLITWISE_SLO_LIMITS[("tbt", 50)]
    else:
        phase, predicted = "prompt", perf.prompt_time_s(max_batched_tokens)
        alone, limit = predicted, SPLITWISE_SLO_LIMITS[("ttft", 50)]
    return recommend_cap(phase, predicted, target_s or limit * alone, caps)


def _perf_under_cap(perf: PerfModel | None, watts: float | None, caps: CapRange | None) -> PerfSummary | None:
    """The node's latency lines as placement should see them: prompt work slows under a cap (token work does not)."""
    if perf is None:
        return None
    summary = perf.summary()
    if watts is None or caps is None:
        return summary
    prompt, token = (
        latency_factor("prompt", watts, caps.rated_w),
        latency_factor("token", watts, caps.rated_w),
    )
    return dataclasses.replace(
        summary,
        prompt_fixed_s=summary.prompt_fixed_s * prompt,
        prompt_per_token_s=summary.prompt_per_token_s * prompt,
        token_fixed_s=summary.token_fixed_s * token,
        token_per_seq_s=summary.token_per_seq_s * token,
    )
