"""GPU power caps for the low-power (decode) pool: what a cap does, which cap the SLO slack allows, applying it.

What the Splitwise facts (shared/design/splitwise-facts.md) say, and what this module derives from them:
- Per-GPU rating: A100 400 W, H100 700 W (Table I). Other accelerators: the machine's rating split over its GPUs
  times GPU_POWER_SHARE.
- Capping each GPU to 50% of its rating takes a DGX-H100 to 70% of its machine power (HHcap, 10200 W -> 7140 W).
  If GPUs draw a share s of the machine's power, 1 - s * (1 - 0.5) = 0.7, so s = GPU_POWER_SHARE = 0.6; a cap at
  fraction f of the rating then takes the machine to 1 - 0.6 * (1 - f) of its rating.
- Latency under a cap: token (decode) iterations barely change from 700 W to 350 W per GPU (the capped-H100 rows of
  perf_model.csv keep the token time); prompt iterations take 1.30x at 350 W. Between the rating and half of it we
  interpolate linearly in the cap; below half the facts measure nothing, so MIN_CAP_FRACTION is the floor of every
  range we derive (NVML's own minimum is often lower: we do not go there without data).
recommend_cap returns the lowest cap whose predicted latency stays within the node's target. apply_cap sets it
through NVML, and by default only says which NVML calls it would make (dry run).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from cluster.machines import MachineType

# Table I of the facts: rated board power per accelerator, W.
GPU_RATED_W = {"a100-80gb": 400.0, "h100-80gb": 700.0, "h100-80gb-pcap": 700.0}
GPU_POWER_SHARE = 0.6  # derived above from HHcap: 50% per GPU -> 70% machine power
MIN_CAP_FRACTION = 0.5  # the lowest per-GPU cap the facts measure (H100 at 350 of 700 W)
# Latency at MIN_CAP_FRACTION relative to uncapped: prompt 1.30x (capped-H100 perf rows), token unchanged.
SLOWDOWN_AT_MIN_CAP = {"prompt": 1.30, "token": 1.0}

LatencyPhase = Literal["prompt", "token"]


class PowerCapError(ValueError):
    """A cap that cannot be set: out of the GPU's range, no GPU to cap, or NVML refused it."""


@dataclass(frozen=True, slots=True)
class CapRange:
    """The per-GPU caps one may choose, W, and the rating they are fractions of."""

    min_w: float
    max_w: float
    rated_w: float

    def __post_init__(self) -> None:
        if not 0 < self.min_w <= self.max_w or not math.isfinite(self.max_w) or self.rated_w <= 0:
            raise ValueError(f"bad cap range {self.min_w}..{self.max_w} W (rated {self.rated_w} W)")

    def check(self, watts: float) -> None:
        if not self.min_w <= watts <= self.max_w:
            raise PowerCapError(
                f"a power cap of {watts:g} W per GPU is outside this GPU's range {self.min_w:g}..{self.max_w:g} W"
            )


@dataclass(frozen=True, slots=True)
class CapDecision:
    watts: float  # per GPU
    predicted_s: float  # the latency predicted under this cap
    reason: str


@dataclass(frozen=True, slots=True)
class NvmlCall:
    """One NVML setter call: made for real, or only described in a dry run."""

    function: str
    gpu_index: int
    milliwatts: int

    def __str__(self) -> str:
        return f"{self.function}(gpu {self.gpu_index}, {self.milliwatts} mW)"


def gpu_rated_w(machine: MachineType) -> float:
    if machine.gpus < 1:
        raise PowerCapError(f"machine type {machine.name!r} has no GPUs to cap")
    return GPU_RATED_W.get(machine.accelerator, machine.rated_power_w * GPU_POWER_SHARE / machine.gpus)


def cap_range_of(machine: MachineType) -> CapRange:
    """Per-GPU caps allowed on a machine type: from MIN_CAP_FRACTION of the rating up to the rating."""
    rated = gpu_rated_w(machine)
    return CapRange(MIN_CAP_FRACTION * rated, rated, rated)


def cap_range_from_nvml(nvml: Any, gpu_index: int) -> CapRange:
    """A GPU's own limits (NVML, in mW), with our floor at MIN_CAP_FRACTION of its default limit."""
    handle = nvml.nvmlDeviceGetHandleByIndex(gpu_index)
    low_mw, high_mw = nvml.nvmlDeviceGetPowerManagementLimitConstraints(handle)
    rated = nvml.nvmlDeviceGetPowerManagementDefaultLimit(handle) / 1000.0
    low = max(low_mw / 1000.0, MIN_CAP_FRACTION * rated)
    return CapRange(min(low, high_mw / 1000.0), high_mw / 1000.0, rated)


def latency_factor(phase: LatencyPhase, watts: float, rated_w: float) -> float:
    """Iteration time under a per-GPU cap relative to uncapped: linear from 1 at the rating to the measured
    slowdown at MIN_CAP_FRACTION (clamped there: the facts say nothing about lower caps)."""
    fraction = min(1.0, max(MIN_CAP_FRACTION, watts / rated_w))
    return 1.0 + (SLOWDOWN_AT_MIN_CAP[phase] - 1.0) * (1.0 - fraction) / (1.0 - MIN_CAP_FRACTION)


def recommend_cap(phase: LatencyPhase, predicted_s: float, target_s: float, caps: CapRange) -> CapDecision:
    """The lowest per-GPU cap whose predicted latency (uncapped: predicted_s) stays within target_s.

    phase: what the node's SLO is about: "prompt" (TTFT, a prefill node) or "token" (TBT, a decode node)."""
    if not (predicted_s > 0 and target_s > 0):
        raise ValueError(f"latencies must be > 0, got predicted {predicted_s} s, target {target_s} s")
    uncapped = predicted_s * latency_factor(phase, caps.max_w, caps.rated_w)
    if uncapped > target_s:
        return CapDecision(
            caps.max_w,
            uncapped,
            f"no slack: {phase} latency {uncapped * 1e3:.1f} ms already exceeds the {target_s * 1e3:.1f} ms "
            f"target at {caps.max_w:g} W, so the GPU stays at its highest limit",
        )
    # latency_factor is linear and falls as the cap rises: solve for the cap that meets the target exactly.
    slope = (SLOWDOWN_AT_MIN_CAP[phase] - 1.0) / ((1.0 - MIN_CAP_FRACTION) * caps.rated_w)
    needed = caps.rated_w - (target_s / predicted_s - 1.0) / slope if slope > 0 else caps.min_w
    # Whole watts, rounded up (less a hair, so 525.0000001 from float error stays 525).
    watts = float(min(caps.max_w, max(caps.min_w, math.ceil(needed - 1e-6))))
    latency = predicted_s * latency_factor(phase, watts, caps.rated_w)
    bound = "the lowest cap allowed" if watts == caps.min_w else "the lowest cap that meets the target"
    return CapDecision(
        watts,
        latency,
        f"{bound}: {phase} latency {latency * 1e3:.1f} ms against a {target_s * 1e3:.1f} ms target "
        f"({latency_factor(phase, watts, caps.rated_w):.2f}x uncapped)",
    )


def capped_machine(machine: MachineType, watts_per_gpu: float) -> MachineType:
    """The machine type as it draws under a per-GPU cap: its modeled maximum falls with the GPUs' share.

    A machine without GPUs (the `cpu` type) takes the figure as its whole-machine limit."""
    if machine.gpus < 1:
        limit = watts_per_gpu
    else:
        fraction = min(1.0, watts_per_gpu / gpu_rated_w(machine))
        limit = machine.rated_power_w * (1.0 - GPU_POWER_SHARE * (1.0 - fraction))
    if not machine.idle_power_w <= limit <= machine.rated_power_w:
        raise PowerCapError(
            f"a cap of {watts_per_gpu:g} W gives {machine.name} a limit of {limit:.0f} W, outside its idle "
            f"{machine.idle_power_w:g} W .. rated {machine.rated_power_w:g} W"
        )
    return dataclasses.replace(machine, capped_power_w=limit)


def apply_cap(
    watts: float, nvml: Any, gpu_indices: Sequence[int] | None = None, dry_run: bool = True
) -> list[NvmlCall]:
    """Cap every listed GPU (all of NVML's when None) to `watts`; return the setter calls, made or (dry run) not.

    Every GPU's constraints are checked before any is changed, so a bad value changes nothing."""
    indices = list(range(nvml.nvmlDeviceGetCount())) if gpu_indices is None else list(gpu_indices)
    if not indices:
        raise PowerCapError("no GPU to cap")
    milliwatts = round(watts * 1000)
    calls = []
    for index in indices:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        low, high = nvml.nvmlDeviceGetPowerManagementLimitConstraints(handle)
        if not low <= milliwatts <= high:
            raise PowerCapError(
                f"GPU {index}: a power cap of {watts:g} W is outside its range {low / 1000:g}..{high / 1000:g} W"
            )
        calls.append((handle, NvmlCall("nvmlDeviceSetPowerManagementLimit", index, milliwatts)))
    if not dry_run:
        for handle, call in calls:
            try:
                nvml.nvmlDeviceSetPowerManagementLimit(handle, call.milliwatts)
            except Exception as exc:  # NVMLError_NoPermission and friends: setting a cap needs root
                raise PowerCapError(f"GPU {call.gpu_index}: NVML refused the cap: {exc}") from exc
    return [call for _, call in calls]
